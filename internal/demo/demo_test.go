package demo_test

import (
	"bytes"
	"context"
	"fmt"
	"os"
	"regexp"
	"testing"
	"time"

	"go.uber.org/zap"

	"github.com/buildstate/buildstate/internal/demo"
	"github.com/buildstate/buildstate/internal/testenv"
)

func TestMain(m *testing.M) { testenv.Main(m) }

// The README's first command, in-process: the printed table is what the
// contract's rules give for the demo's shuffled, duplicated history.
func TestDemo(t *testing.T) {
	testenv.AdminURL(t) // the same Postgres discovery as the demo, started once for the package
	var out bytes.Buffer
	db := fmt.Sprintf("buildstate_demo_test_%d", time.Now().UnixNano())
	err := demo.Run(context.Background(), demo.Options{Getenv: os.Getenv, Stdout: &out, Log: zap.NewNop(), Database: db})
	if err != nil {
		t.Fatalf("demo.Run = %v\n%s", err, out.String())
	}
	for _, want := range []string{
		`api\s+canceled\s+api-7\s`,
		`docs\s+failed\s+dc-1\s`,
		`web-shop\s+building\s+ws-1\s`, // ws-2 is newest, but only ws-1 has metrics
		`ws-1\s+web-shop\s+succeeded\s`,
		`seq 17\s+builds.web-shop.started\s+malformed_json`,
		`0 timing violations, 0 dangling current builds`,
		// times with date and zone, in the one format (when.Layout)
		`ws-1\s+web-shop\s+succeeded\s+\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d{3} \S+\s+\d{4}-\d\d-\d\d `,
	} {
		if !regexp.MustCompile(want).MatchString(out.String()) {
			t.Errorf("demo output lacks %q:\n%s", want, out.String())
		}
	}
}
