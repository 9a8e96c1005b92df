package otelpglocks_test

import (
	"context"
	"errors"
	"io"
	"net/http/httptest"
	"strings"
	"testing"
	"time"

	"github.com/jackc/pgx/v5/pgxpool"
	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/promhttp"
	"go.opentelemetry.io/otel/attribute"
	"go.opentelemetry.io/otel/codes"
	otelprom "go.opentelemetry.io/otel/exporters/prometheus"
	sdkmetric "go.opentelemetry.io/otel/sdk/metric"
	"go.opentelemetry.io/otel/sdk/metric/metricdata"
	sdktrace "go.opentelemetry.io/otel/sdk/trace"
	"go.opentelemetry.io/otel/sdk/trace/tracetest"

	"github.com/pglocks/pglocks"
	"github.com/pglocks/pglocks/internal/pgtest"
	"github.com/pglocks/pglocks/otelpglocks"
)

var srv *pgtest.Server

func TestMain(m *testing.M) { pgtest.Main(m, &srv, nil) }

func pool(t *testing.T, dsn string) *pgxpool.Pool {
	t.Helper()
	p, err := pgxpool.New(context.Background(), dsn)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(p.Close)
	return p
}

func locker(t *testing.T, p *pgxpool.Pool, opts ...pglocks.Option) *pglocks.Locker {
	t.Helper()
	l, err := pglocks.New(p, opts...)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = l.Close() })
	return l
}

// metrics collects rm into name -> attribute set -> value (a histogram's
// count, a sum's value).
func metrics(t *testing.T, r *sdkmetric.ManualReader) map[string]map[string]float64 {
	t.Helper()
	var rm metricdata.ResourceMetrics
	if err := r.Collect(context.Background(), &rm); err != nil {
		t.Fatal(err)
	}
	out := map[string]map[string]float64{}
	for _, sm := range rm.ScopeMetrics {
		if sm.Scope.Name != otelpglocks.ScopeName {
			continue
		}
		for _, m := range sm.Metrics {
			vals := map[string]float64{}
			switch d := m.Data.(type) {
			case metricdata.Histogram[float64]:
				for _, p := range d.DataPoints {
					vals[attrs(p.Attributes)] = float64(p.Count)
				}
			case metricdata.Sum[int64]:
				for _, p := range d.DataPoints {
					vals[attrs(p.Attributes)] = float64(p.Value)
				}
			default:
				t.Fatalf("%s: unexpected data %T", m.Name, m.Data)
			}
			out[m.Name] = vals
		}
	}
	return out
}

func attrs(s attribute.Set) string {
	var b []string
	for _, kv := range s.ToSlice() {
		b = append(b, string(kv.Key)+"="+kv.Value.String())
	}
	return strings.Join(b, ",")
}

// The Tracer records acquisitions, what is held and waited for, losses and
// leadership as metrics, and acquisitions as spans covering the hold,
// against a real server.
func TestTracer(t *testing.T) {
	ctx := t.Context()
	dsn := srv.DB(t)
	reader := sdkmetric.NewManualReader()
	mp := sdkmetric.NewMeterProvider(sdkmetric.WithReader(reader))
	sr := tracetest.NewSpanRecorder()
	tp := sdktrace.NewTracerProvider(sdktrace.WithSpanProcessor(sr))
	tr, err := otelpglocks.New(otelpglocks.WithMeterProvider(mp), otelpglocks.WithTracerProvider(tp))
	if err != nil {
		t.Fatal(err)
	}
	a := locker(t, pool(t, dsn), pglocks.WithTracer(tr))
	b := locker(t, pool(t, dsn), pglocks.WithTracer(tr))
	k := pglocks.Name("nightly-report")

	lk, err := a.Lock(ctx, k, pglocks.Label("nightly-report"))
	if err != nil {
		t.Fatal(err)
	}
	_, err = b.TryLock(ctx, k)
	if !errors.Is(err, pglocks.ErrLocked) {
		t.Fatalf("TryLock: %v", err)
	}
	// A wait, seen in the waits gauge, that times out.
	wctx, cancel := context.WithTimeout(ctx, 400*time.Millisecond)
	defer cancel()
	waited := make(chan error)
	go func() {
		_, err := b.Lock(wctx, k)
		waited <- err
	}()
	deadline := time.Now().Add(5 * time.Second)
	for {
		m := metrics(t, reader)["pglocks.waits"]
		if m["pglocks.wait.place=server"]+m["pglocks.wait.place=multiplexed"] == 1 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("the wait never showed in pglocks.waits: %v", m)
		}
		time.Sleep(10 * time.Millisecond)
	}
	if err := <-waited; !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("wait: %v", err)
	}
	m := metrics(t, reader)
	if got := m["pglocks.locks.held"]["pglocks.lock.mode=exclusive"]; got != 1 {
		t.Errorf("pglocks.locks.held exclusive = %v, want 1 (%v)", got, m["pglocks.locks.held"])
	}
	d := m["pglocks.acquire.duration"]
	for set, want := range map[string]float64{
		"pglocks.acquire.outcome=acquired,pglocks.acquire.type=wait,pglocks.lock.label=nightly-report,pglocks.lock.mode=exclusive": 1,
		"pglocks.acquire.outcome=locked,pglocks.acquire.type=try,pglocks.lock.mode=exclusive":                                      1,
		"pglocks.acquire.outcome=timeout,pglocks.acquire.type=wait,pglocks.lock.mode=exclusive":                                    1,
	} {
		if d[set] != want {
			t.Errorf("pglocks.acquire.duration{%s} count = %v, want %v (all: %v)", set, d[set], want, d)
		}
	}
	if m["pglocks.sessions"]["pglocks.session.state=holding"] < 1 {
		t.Errorf("pglocks.sessions: %v", m["pglocks.sessions"])
	}

	// A loss: the holder's session is terminated.
	var pid int
	if err := srv.Admin.QueryRow(ctx, `SELECT pid FROM pg_locks WHERE locktype = 'advisory' AND granted`).Scan(&pid); err != nil {
		t.Fatal(err)
	}
	if _, err := srv.Admin.Exec(ctx, "SELECT pg_terminate_backend($1)", pid); err != nil {
		t.Fatal(err)
	}
	select {
	case <-lk.Done():
	case <-time.After(10 * time.Second):
		t.Fatal("the loss was not noticed")
	}
	// TraceLoss runs just after Done is closed, on the goroutine that
	// found the loss.
	for deadline := time.Now().Add(2 * time.Second); ; time.Sleep(5 * time.Millisecond) {
		m = metrics(t, reader)
		if got := m["pglocks.lock.losses"]["pglocks.lock.label=nightly-report"]; got == 1 {
			break
		} else if time.Now().After(deadline) {
			t.Fatalf("pglocks.lock.losses = %v 2 s after the loss", m["pglocks.lock.losses"])
		}
	}
	if got := m["pglocks.locks.held"]["pglocks.lock.mode=exclusive"]; got != 0 {
		t.Errorf("a lost lock still counted held: %v", got)
	}

	// A leader's term, and a plain Do.
	lctx, stop := context.WithCancel(ctx)
	err = b.Lead(lctx, pglocks.Name("leader"), func(ctx context.Context) error {
		if got := metrics(t, reader)["pglocks.leader.terms"][""]; got != 1 {
			t.Errorf("pglocks.leader.terms during the term = %v", got)
		}
		stop()
		return nil
	})
	if !errors.Is(err, context.Canceled) {
		t.Fatalf("Lead: %v", err)
	}
	if err := a.Do(ctx, k, func(context.Context) error { time.Sleep(20 * time.Millisecond); return nil }); err != nil {
		t.Fatal(err)
	}
	m = metrics(t, reader)
	if c := m["pglocks.leader.changes"]; c["pglocks.leader.change=gained"] != 1 || c["pglocks.leader.change=lost"] != 1 {
		t.Errorf("pglocks.leader.changes = %v", c)
	}
	if got := m["pglocks.leader.terms"][""]; got != 0 {
		t.Errorf("pglocks.leader.terms after = %v", got)
	}

	// Spans: each acquisition, ended when its lock went.
	spans := map[string][]sdktrace.ReadOnlySpan{}
	for _, s := range sr.Ended() {
		spans[s.Name()] = append(spans[s.Name()], s)
	}
	if n := len(sr.Started()) - len(sr.Ended()); n != 0 {
		t.Errorf("%d spans not ended", n)
	}
	events := func(s sdktrace.ReadOnlySpan) []string {
		var e []string
		for _, ev := range s.Events() {
			e = append(e, ev.Name)
		}
		return e
	}
	locks := spans["pglocks Lock"]
	if len(locks) != 3 { // a's lost lock, b's timed-out wait, a's Do
		t.Fatalf("pglocks Lock spans: %d", len(locks))
	}
	lost, timedOut, do := locks[0], locks[1], locks[2]
	if lost.Name() != "pglocks Lock" || strings.Join(events(lost), ",") != "acquired,lost" || lost.Status().Code != codes.Error {
		// Ended in order: the timed-out wait ends first.
		lost, timedOut = timedOut, lost
	}
	if got := strings.Join(events(lost), ","); got != "acquired,lost" || lost.Status().Code != codes.Error {
		t.Errorf("the lost lock's span: events %s, status %v", got, lost.Status())
	}
	if lost.EndTime().Sub(lost.StartTime()) < 400*time.Millisecond {
		t.Errorf("the lost lock's span does not cover its hold: %v", lost.EndTime().Sub(lost.StartTime()))
	}
	if timedOut.Status().Code != codes.Error {
		t.Errorf("the timed-out wait's span: status %v", timedOut.Status())
	}
	if got := strings.Join(events(do), ","); got != "acquired,released" || do.EndTime().Sub(do.StartTime()) < 20*time.Millisecond {
		t.Errorf("Do's span: events %s, lasting %v", got, do.EndTime().Sub(do.StartTime()))
	}
	if try := spans["pglocks TryLock"]; len(try) != 1 || try[0].Status().Code == codes.Error {
		t.Errorf("TryLock's span: %v (ErrLocked is an answer, not an error)", try)
	}
	if lead := spans["pglocks Lead"]; len(lead) != 1 || strings.Join(events(lead[0]), ",") != "acquired,elected,released" {
		t.Errorf("Lead's span: %v", lead)
	}
	for _, kv := range lost.Attributes() {
		if kv.Key == otelpglocks.AttrKey && kv.Value.AsString() != k.String() {
			t.Errorf("span key %s, want %s", kv.Value.AsString(), k)
		}
	}
}

// The metrics reach Prometheus through the OpenTelemetry exporter.
func TestPrometheus(t *testing.T) {
	reg := prometheus.NewRegistry()
	exp, err := otelprom.New(otelprom.WithRegisterer(reg))
	if err != nil {
		t.Fatal(err)
	}
	mp := sdkmetric.NewMeterProvider(sdkmetric.WithReader(exp))
	tr, err := otelpglocks.New(otelpglocks.WithMeterProvider(mp))
	if err != nil {
		t.Fatal(err)
	}
	l := locker(t, pool(t, srv.DB(t)), pglocks.WithTracer(tr))
	lk, err := l.Lock(t.Context(), pglocks.ID(1), pglocks.Label("migrations"))
	if err != nil {
		t.Fatal(err)
	}
	defer lk.Release(context.Background())
	hs := httptest.NewServer(promhttp.HandlerFor(reg, promhttp.HandlerOpts{}))
	defer hs.Close()
	resp, err := hs.Client().Get(hs.URL)
	if err != nil {
		t.Fatal(err)
	}
	body, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	for _, want := range []string{
		`pglocks_acquire_duration_seconds_count{otel_scope_name="github.com/pglocks/pglocks/otelpglocks"`,
		`pglocks_lock_label="migrations"`,
		`pglocks_locks_held{otel_scope_name="github.com/pglocks/pglocks/otelpglocks",otel_scope_schema_url="",otel_scope_version="",pglocks_lock_mode="exclusive"} 1`,
	} {
		if !strings.Contains(string(body), want) {
			t.Errorf("the scrape lacks %s:\n%s", want, grep(string(body), "pglocks_"))
		}
	}
}

func grep(s, sub string) string {
	var out []string
	for _, line := range strings.Split(s, "\n") {
		if strings.Contains(line, sub) {
			out = append(out, line)
		}
	}
	return strings.Join(out, "\n")
}
