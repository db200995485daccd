package projector

import (
	"sync"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
	dto "github.com/prometheus/client_model/go"

	"github.com/buildstate/buildstate/internal/events"
	"github.com/buildstate/buildstate/internal/projection"
	"github.com/buildstate/buildstate/internal/web"
)

// Telemetry is the projector's Prometheus metrics.
type Telemetry struct {
	Registry     *prometheus.Registry
	Applied      prometheus.Counter
	DeadLettered prometheus.Counter
	Duplicates   prometheus.Counter
	Lag          prometheus.Gauge
	Retries      *prometheus.CounterVec
	Batches      prometheus.Histogram
	Stuck        *prometheus.GaugeVec
	Dropped      *prometheus.CounterVec
	Fenced       prometheus.Counter // batches refused at commit: another instance acquired one of their partitions
	Acquired     prometheus.Counter // partitions acquired by this instance
	Owned        prometheus.Gauge   // partitions this instance holds the current epoch of (as far as it knows)
	Redone       prometheus.Counter // batches folded again: the partition's memory took a claimed build or an applied id for new
	Remembered   prometheus.Gauge   // projects the writers' memory holds

	mu      sync.Mutex // guards the rate's sample
	sampled time.Time
	applied float64
	perSec  float64
}

// NewTelemetry registers the metrics on a fresh registry (with the Go and
// process collectors). Every metric exists from the start, at zero:
// buildstate_write_retries_total with each label pair a retry can report.
func NewTelemetry() *Telemetry {
	t := &Telemetry{
		Registry: prometheus.NewRegistry(),
		Applied: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "buildstate_events_applied_total", Help: "Valid events applied to the read model.",
		}),
		DeadLettered: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "buildstate_events_dead_lettered_total", Help: "Messages kept as dead letters.",
		}),
		Duplicates: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "buildstate_events_duplicates_total", Help: "Events ignored because their id was already applied.",
		}),
		Lag: prometheus.NewGauge(prometheus.GaugeOpts{
			Name: "buildstate_consumer_lag", Help: "Messages not yet acknowledged by the durable consumer (pending + ack pending).",
		}),
		Retries: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "buildstate_write_retries_total", Help: "Batch writes retried after a constraint violation, serialization failure or deadlock.",
		}, []string{"sqlstate", "constraint"}),
		Batches: prometheus.NewHistogram(prometheus.HistogramOpts{
			Name: "buildstate_batch_seconds", Help: "Time to apply one batch.", Buckets: prometheus.ExponentialBuckets(0.001, 2, 14),
		}),
		Stuck: prometheus.NewGaugeVec(prometheus.GaugeOpts{
			Name: "buildstate_builds_stuck",
			Help: "Builds waiting on a worker past the limits (state queued: no start; building: no completion), counted every minute.",
		}, []string{"state"}),
		Dropped: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "buildstate_fields_dropped_total",
			Help: "Optional measurements (data.<field>) left out of applied events because their values were out of range; the events applied without them.",
		}, []string{"field"}),
		Fenced: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "buildstate_fenced_total",
			Help: "Batches refused at commit because another instance had acquired one of their partitions since; nothing of them was written, the messages of those partitions were given back and the rest applied again.",
		}),
		Acquired: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "buildstate_partition_acquired_total", Help: "Partitions this instance acquired (raised their epochs), counted once each time.",
		}),
		Owned: prometheus.NewGauge(prometheus.GaugeOpts{
			Name: "buildstate_partition_owned", Help: "Partitions this instance holds (each from its acquire to its release or a fenced commit).",
		}),
		Redone: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "buildstate_batch_redone_total",
			Help: "Batches folded again on what the store holds: the partition's memory had taken a build claimed before it acquired the partition, or an id applied longer ago than it remembers, for new.",
		}),
		Remembered: prometheus.NewGauge(prometheus.GaugeOpts{
			Name: "buildstate_memory_projects", Help: "Projects the writers' memory holds (bounded by --memory-projects).",
		}),
	}
	for _, state := range []string{projection.StuckQueued, projection.StuckBuilding} {
		t.Stuck.WithLabelValues(state).Set(0) // present from the start
	}
	for _, f := range events.Measurements() {
		t.Dropped.WithLabelValues(f) // every field from zero, not from its first drop
	}
	for _, l := range projection.ExpectedRetries {
		t.Retries.WithLabelValues(l[0], l[1])
	}
	t.Registry.MustRegister(t.Applied, t.DeadLettered, t.Duplicates, t.Lag, t.Retries, t.Batches, t.Stuck, t.Dropped, t.Fenced, t.Acquired, t.Owned, t.Redone, t.Remembered,
		collectors.NewGoCollector(), collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}))
	return t
}

// FieldDropped counts a measurement left out of an applied event (projection.Observer).
func (t *Telemetry) FieldDropped(field string) {
	t.Dropped.WithLabelValues(field).Inc()
}

// WriteRetried counts a retried write (projection.Observer).
func (t *Telemetry) WriteRetried(sqlstate, constraint string) {
	t.Retries.WithLabelValues(sqlstate, constraint).Inc()
}

// sample updates the applied-events rate from the counter's growth since
// the last sample; the lag watcher calls it every few seconds.
func (t *Telemetry) sample(now time.Time) {
	n := value(t.Applied)
	t.mu.Lock()
	defer t.mu.Unlock()
	if !t.sampled.IsZero() {
		if d := now.Sub(t.sampled).Seconds(); d > 0 {
			t.perSec = (n - t.applied) / d
		}
	}
	t.sampled, t.applied = now, n
}

// Stats are the live figures the status page shows.
func (t *Telemetry) Stats() web.Stats {
	t.mu.Lock()
	defer t.mu.Unlock()
	return web.Stats{Lag: value(t.Lag), EventsPerSecond: t.perSec}
}

// value reads a counter or gauge.
func value(m prometheus.Metric) float64 {
	var d dto.Metric
	if err := m.Write(&d); err != nil {
		return 0
	}
	if c := d.GetCounter(); c != nil {
		return c.GetValue()
	}
	return d.GetGauge().GetValue()
}
