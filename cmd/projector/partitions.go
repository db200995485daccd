package main

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"slices"
	"strconv"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/nats-io/nats.go/jetstream"
	"go.uber.org/zap"

	"github.com/buildstate/buildstate/internal/events"
	"github.com/buildstate/buildstate/internal/natsjs"
	"github.com/buildstate/buildstate/internal/projection"
	"github.com/buildstate/buildstate/internal/redact"
)

// runPartitions is `projector partitions`: who holds each partition's fence
// (projector_partitions), at which epoch, how far it has applied, and its
// durable's lag (from NATS, when reachable).
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
	lag, members, reached := partitionLag(ctx, c, rows, stderr)
	if *asJSON {
		enc := json.NewEncoder(stdout)
		for i, r := range rows {
			out := partitionJSON(r)
			out.Lag = lag[i]
			if err := enc.Encode(out); err != nil {
				return err
			}
		}
		return nil
	}
	tw := tabwriter.NewWriter(stdout, 0, 0, 2, ' ', 0)
	fmt.Fprintln(tw, "LAYOUT\tPARTITION\tEPOCH\tOWNER\tAPPLIED SEQ\tACQUIRED\tLAG")
	for i, r := range rows {
		l := "-"
		if lag[i] != nil {
			l = strconv.FormatUint(*lag[i], 10)
		}
		fmt.Fprintf(tw, "%s\t%d\t%d\t%s\t%s\t%s\t%s\n", r.Layout, r.Partition, r.Epoch, orDash(&r.Owner),
			strconv.FormatInt(r.AppliedSeq, 10), timeOrDash(r.AcquiredAt), l)
	}
	if err := tw.Flush(); err != nil {
		return err
	}
	if reached && slices.ContainsFunc(rows, func(r projection.PartitionRow) bool { return r.Layout != projection.LayoutP1 }) {
		// The group that shares a partitioned layout (natsjs.Group).
		fmt.Fprintf(stdout, "members (%d): %s\n", len(members), strings.Join(members, ", "))
	}
	return nil
}

// partitionLag is, for each row, what its durable has not applied yet
// (pending + awaiting its ack: p1's is the durable, a partition's its
// <durable>-p<n>-<k>), nil where that is unknown: NATS unreachable (said
// once on stderr; reached is false), or no such durable (a retired
// layout's, deleted); and the durable's group members.
func partitionLag(ctx context.Context, c *common, rows []projection.PartitionRow, stderr io.Writer) (lag []*uint64, members []string, reached bool) {
	out := make([]*uint64, len(rows))
	nc, js, err := natsjs.ConnectJetStream(c.cfg.NATS, "buildstate-projector-partitions", zap.NewNop())
	if err != nil {
		fmt.Fprintf(stderr, "lag not shown: %v\n", redact.Error(err))
		return out, nil, false
	}
	defer nc.Close()
	mctx, cancel := context.WithTimeout(ctx, 2*time.Second)
	members, err = natsjs.GroupMembers(mctx, js, c.cfg.Durable)
	cancel()
	if err != nil {
		fmt.Fprintf(stderr, "members not shown: %v\n", redact.Error(err))
	}
	for i, r := range rows {
		name := c.cfg.Durable
		if l, err := events.ParseLayout(r.Layout); err == nil && l.Partitioned() {
			name = natsjs.PartitionDurable(c.cfg.Durable, l, r.Partition)
		}
		cctx, cancel := context.WithTimeout(ctx, 2*time.Second)
		var info *jetstream.ConsumerInfo
		cons, err := js.Consumer(cctx, c.cfg.Stream, name)
		if err == nil {
			info, err = cons.Info(cctx)
		}
		cancel()
		if err == nil {
			n := info.NumPending + uint64(info.NumAckPending)
			out[i] = &n
		}
	}
	return out, members, true
}

type partitionOut struct {
	Layout     string  `json:"layout"`
	Partition  int     `json:"partition"`
	Epoch      int64   `json:"epoch"`
	Owner      string  `json:"owner"`
	AppliedSeq int64   `json:"applied_seq"`
	AcquiredAt *string `json:"acquired_at"`
	Lag        *uint64 `json:"lag"` // null: unknown (NATS unreachable, or no durable)
}

func partitionJSON(r projection.PartitionRow) partitionOut {
	out := partitionOut{Layout: r.Layout, Partition: r.Partition, Epoch: r.Epoch, Owner: r.Owner, AppliedSeq: r.AppliedSeq}
	if r.AcquiredAt != nil {
		s := r.AcquiredAt.UTC().Format("2006-01-02T15:04:05.000Z07:00")
		out.AcquiredAt = &s
	}
	return out
}
