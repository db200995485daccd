// Package when prints times for people, in one format everywhere: the
// status page, `projector status` and the demo.
package when

import (
	"fmt"
	"time"
)

// Layout is the one format: date, time to the millisecond, and zone.
const Layout = "2006-01-02 15:04:05.000 MST"

// Format prints t in loc (time.Local when nil) with Layout.
func Format(t time.Time, loc *time.Location) string {
	if loc == nil {
		loc = time.Local
	}
	return t.In(loc).Format(Layout)
}

// Ago says how long before now t was, roughly: "just now", "42 s ago",
// "3 min ago", "5 h ago", "2 days ago"; "in 3 min" for a time after now.
func Ago(t, now time.Time) string {
	d := now.Sub(t)
	suffix := " ago"
	if d < 0 {
		d, suffix = -d, ""
	}
	var s string
	switch {
	case d < time.Second:
		return "just now"
	case d < time.Minute:
		s = fmt.Sprintf("%d s", int(d/time.Second))
	case d < time.Hour:
		s = fmt.Sprintf("%d min", int(d/time.Minute))
	case d < 48*time.Hour:
		s = fmt.Sprintf("%d h", int(d/time.Hour))
	default:
		s = fmt.Sprintf("%d days", int(d/(24*time.Hour)))
	}
	if suffix == "" {
		return "in " + s
	}
	return s + suffix
}
