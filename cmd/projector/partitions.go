package main

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"strconv"
	"text/tabwriter"

	"github.com/buildstate/buildstate/internal/projection"
)

// runPartitions is `projector partitions`: who holds each partition's fence
// (projector_partitions), at which epoch, and how far it has applied.
func runPartitions(ctx context.Context, args []string, getenv func(string) string, stdout, stderr io.Writer) error {
	fs, c := newFlags("partitions", getenv, stderr)
	asJSON := fs.Bool("json", false, "print one JSON object per line")
	if err := fs.Parse(args); err != nil {
		return err
	}
	if fs.NArg() > 0 {
		return fmt.Errorf("partitions: unexpected arguments %q", fs.Args())
	}
	store, closeStore, err := openStore(ctx, c)
	if err != nil {
		return err
	}
	defer closeStore()
	rows, err := store.Partitions(ctx)
	if err != nil {
		return err
	}
	if *asJSON {
		enc := json.NewEncoder(stdout)
		for _, r := range rows {
			if err := enc.Encode(partitionJSON(r)); err != nil {
				return err
			}
		}
		return nil
	}
	tw := tabwriter.NewWriter(stdout, 0, 0, 2, ' ', 0)
	fmt.Fprintln(tw, "LAYOUT\tPARTITION\tEPOCH\tOWNER\tAPPLIED SEQ\tACQUIRED")
	for _, r := range rows {
		fmt.Fprintf(tw, "%s\t%d\t%d\t%s\t%s\t%s\n", r.Layout, r.Partition, r.Epoch, orDash(&r.Owner),
			strconv.FormatInt(r.AppliedSeq, 10), timeOrDash(r.AcquiredAt))
	}
	return tw.Flush()
}

type partitionOut struct {
	Layout     string  `json:"layout"`
	Partition  int     `json:"partition"`
	Epoch      int64   `json:"epoch"`
	Owner      string  `json:"owner"`
	AppliedSeq int64   `json:"applied_seq"`
	AcquiredAt *string `json:"acquired_at"`
}

func partitionJSON(r projection.PartitionRow) partitionOut {
	out := partitionOut{Layout: r.Layout, Partition: r.Partition, Epoch: r.Epoch, Owner: r.Owner, AppliedSeq: r.AppliedSeq}
	if r.AcquiredAt != nil {
		s := r.AcquiredAt.UTC().Format("2006-01-02T15:04:05.000Z07:00")
		out.AcquiredAt = &s
	}
	return out
}
