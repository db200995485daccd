package main

import (
	"context"
	"errors"
	"io"
)

// Filled in by the replay work (issue 4).
func runRebuild(ctx context.Context, args []string, getenv func(string) string, stdout, stderr io.Writer) error {
	return errors.New("rebuild: not built yet")
}

func runVerify(ctx context.Context, args []string, getenv func(string) string, stdout, stderr io.Writer) error {
	return errors.New("verify: not built yet")
}

func runStatusAt(ctx context.Context, c *common, projectID, at string, seq uint64, asJSON bool, stdout io.Writer) error {
	return errors.New("status --at/--seq: not built yet")
}
