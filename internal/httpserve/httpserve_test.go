package httpserve

import (
	"bufio"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"strings"
	"testing"
	"time"
)

func serve(t *testing.T) string {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	srv := New(http.HandlerFunc(func(w http.ResponseWriter, _ *http.Request) { io.WriteString(w, "ok") }), nil)
	go srv.Serve(ln)
	t.Cleanup(func() { srv.Close() })
	return ln.Addr().String()
}

func TestHeaderCap(t *testing.T) {
	addr := serve(t)
	for _, tt := range []struct {
		name   string
		header int
		want   int
	}{
		{"small headers", 1 << 10, http.StatusOK},
		{"headers over the cap", 2 * MaxHeaderBytes, http.StatusRequestHeaderFieldsTooLarge},
	} {
		t.Run(tt.name, func(t *testing.T) {
			req, _ := http.NewRequest("GET", "http://"+addr+"/", nil)
			req.Header.Set("X-Big", strings.Repeat("x", tt.header))
			resp, err := http.DefaultClient.Do(req)
			if err != nil {
				t.Fatal(err)
			}
			resp.Body.Close()
			if resp.StatusCode != tt.want {
				t.Errorf("GET with %d bytes of header = %d; want %d", tt.header, resp.StatusCode, tt.want)
			}
		})
	}
}

func TestSlowHeadersAreCutOff(t *testing.T) {
	addr := serve(t)
	conn, err := net.Dial("tcp", addr)
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	fmt.Fprint(conn, "GET / HTTP/1.1\r\nHost: x\r\n") // and never the blank line
	conn.SetReadDeadline(time.Now().Add(ReadHeaderTimeout + 10*time.Second))
	// The server closes the connection (EOF) rather than our deadline expiring.
	if _, err = bufio.NewReader(conn).ReadString('\n'); !errors.Is(err, io.EOF) {
		t.Errorf("read from a connection that never finished its headers = %v; want EOF, closed by the server", err)
	}
}
