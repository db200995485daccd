package web

import (
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"html"
	"net/http"
	"strings"

	"github.com/jackc/pgx/v5"
)

// badgeColours are the badge's right-hand colours, by Tone (shields.io's
// palette).
var badgeColours = map[string]string{
	"ok":      "#4c1",
	"bad":     "#e05d44",
	"busy":    "#dfb317",
	"off":     "#9f9f9f",
	"unknown": "#9f9f9f",
}

// badgeMaxAge is how long a client or proxy may reuse a badge without
// asking again; after it, the ETag makes the question cheap (304).
const badgeMaxAge = 30

// serveBadge is GET /badge/{id}.svg: "build | <build_status>", coloured by
// Tone, or "build | unknown" for a project with no row.
func (h *Handler) serveBadge(w http.ResponseWriter, r *http.Request) {
	id, ok := strings.CutSuffix(r.PathValue("file"), ".svg")
	if !ok || id == "" {
		http.NotFound(w, r)
		return
	}
	status := "unknown"
	row, err := h.opts.Store.Project(r.Context(), id)
	switch {
	case errors.Is(err, pgx.ErrNoRows):
	case err != nil:
		h.fail(w, err)
		return
	default:
		status = row.BuildStatus
	}
	body := Badge("build", status, badgeColours[Tone(status)])
	sum := sha256.Sum256(body)
	etag := `"` + hex.EncodeToString(sum[:12]) + `"`
	w.Header().Set("ETag", etag)
	w.Header().Set("Cache-Control", fmt.Sprintf("public, max-age=%d", badgeMaxAge))
	if match := r.Header.Get("If-None-Match"); match != "" && etagMatches(match, etag) {
		w.WriteHeader(http.StatusNotModified)
		return
	}
	w.Header().Set("Content-Type", "image/svg+xml")
	_, _ = w.Write(body)
}

// etagMatches reports whether an If-None-Match header names etag (weak
// comparison, as RFC 9110 asks for If-None-Match).
func etagMatches(header, etag string) bool {
	for _, t := range strings.Split(header, ",") {
		t = strings.TrimPrefix(strings.TrimSpace(t), "W/")
		if t == "*" || t == etag {
			return true
		}
	}
	return false
}

// Badge draws a flat shields-style badge: label on grey, message on colour.
// Text widths are estimated at 7 px a character of 11 px Verdana.
func Badge(label, message, colour string) []byte {
	lw, mw := textWidth(label), textWidth(message)
	w := lw + mw
	var b strings.Builder
	fmt.Fprintf(&b, `<svg xmlns="http://www.w3.org/2000/svg" width="%d" height="20" role="img" aria-label="%s: %s">`, w, esc(label), esc(message))
	fmt.Fprintf(&b, `<title>%s: %s</title>`, esc(label), esc(message))
	b.WriteString(`<linearGradient id="s" x2="0" y2="100%"><stop offset="0" stop-color="#bbb" stop-opacity=".1"/><stop offset="1" stop-opacity=".1"/></linearGradient>`)
	fmt.Fprintf(&b, `<clipPath id="r"><rect width="%d" height="20" rx="3" fill="#fff"/></clipPath>`, w)
	fmt.Fprintf(&b, `<g clip-path="url(#r)"><rect width="%d" height="20" fill="#555"/><rect x="%d" width="%d" height="20" fill="%s"/><rect width="%d" height="20" fill="url(#s)"/></g>`,
		lw, lw, mw, colour, w)
	b.WriteString(`<g fill="#fff" text-anchor="middle" font-family="Verdana,Geneva,DejaVu Sans,sans-serif" font-size="11">`)
	fmt.Fprintf(&b, `<text x="%d" y="15" fill="#010101" fill-opacity=".3">%s</text><text x="%d" y="14">%s</text>`, lw/2, esc(label), lw/2, esc(label))
	fmt.Fprintf(&b, `<text x="%d" y="15" fill="#010101" fill-opacity=".3">%s</text><text x="%d" y="14">%s</text>`, lw+mw/2, esc(message), lw+mw/2, esc(message))
	b.WriteString(`</g></svg>`)
	return []byte(b.String())
}

func textWidth(s string) int { return 7*len([]rune(s)) + 10 }

func esc(s string) string { return html.EscapeString(s) }
