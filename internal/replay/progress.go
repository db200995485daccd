package replay

import (
	"fmt"
	"io"
	"time"
)

// progress prints "label: done/total events (pct), rate/s, ETA" at most
// once per interval, and a last line when the replay ends.
type progress struct {
	w           io.Writer
	every       time.Duration
	label       string
	total, done int
	start, last time.Time
}

func newProgress(w io.Writer, every time.Duration, label string, total int) *progress {
	now := time.Now()
	return &progress{w: w, every: every, label: label, total: total, start: now, last: now}
}

func (p *progress) add(n int) {
	p.done += n
	if p.w == nil {
		return
	}
	if now := time.Now(); now.Sub(p.last) >= p.every {
		p.last = now
		p.print(now, false)
	}
}

func (p *progress) finish() {
	if p.w != nil {
		p.print(time.Now(), true)
	}
}

func (p *progress) print(now time.Time, final bool) {
	elapsed := now.Sub(p.start)
	rate := 0.0
	if elapsed > 0 {
		rate = float64(p.done) / elapsed.Seconds()
	}
	total := max(p.total, p.done)
	pct := 100.0
	if total > 0 {
		pct = 100 * float64(p.done) / float64(total)
	}
	tail := "ETA -"
	switch {
	case final:
		tail = "done in " + elapsed.Round(100*time.Millisecond).String()
	case rate > 0:
		eta := time.Duration(float64(total-p.done) / rate * float64(time.Second))
		tail = "ETA " + eta.Round(time.Second).String()
	}
	fmt.Fprintf(p.w, "%s: %d/%d events (%.1f%%), %.0f/s, %s\n", p.label, p.done, total, pct, rate, tail)
}
