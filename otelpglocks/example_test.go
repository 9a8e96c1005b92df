package otelpglocks_test

import (
	"context"
	"fmt"
	"net/http"
	"net/http/httptest"
	"regexp"
	"strings"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/promhttp"
	otelprom "go.opentelemetry.io/otel/exporters/prometheus"
	sdkmetric "go.opentelemetry.io/otel/sdk/metric"

	"github.com/pglocks/pglocks"
	"github.com/pglocks/pglocks/otelpglocks"
)

// The examples are README.md's code, between the README markers (see
// DEVELOPERS.md); what comes before sets up what that code is handed.

// A Locker whose acquisitions, holds and losses are metrics and spans.
func Example() {
	pool, done := examplePool()
	defer done()
	ctx := context.Background()
	err := func() error {
		// README:begin
		t, err := otelpglocks.New() // the global MeterProvider and TracerProvider, or With…Provider
		if err != nil {
			return err
		}
		locker, err := pglocks.New(pool, pglocks.WithTracer(t))
		if err != nil {
			return err
		}
		defer locker.Close()
		// Metrics carry the label, never the key: keys are unbounded.
		return locker.Do(ctx, pglocks.Name("nightly-report"), runReport, pglocks.Label("nightly-report"))
		// README:end
	}()
	fmt.Println(err)
	// Output:
	// report
	// <nil>
}

// Serve the Lockers' metrics to Prometheus through OpenTelemetry's
// Prometheus exporter, at /metrics.
func Example_prometheus() {
	pool, done := examplePool()
	defer done()
	ctx := context.Background()
	err := func() error {
		// README:begin
		reg := prometheus.NewRegistry()
		exp, err := otelprom.New(otelprom.WithRegisterer(reg))
		if err != nil {
			return err
		}
		t, err := otelpglocks.New(otelpglocks.WithMeterProvider(sdkmetric.NewMeterProvider(sdkmetric.WithReader(exp))))
		if err != nil {
			return err
		}
		locker, err := pglocks.New(pool, pglocks.WithTracer(t))
		if err != nil {
			return err
		}
		defer locker.Close()
		http.Handle("/metrics", promhttp.HandlerFor(reg, promhttp.HandlerOpts{})) // then http.ListenAndServe
		// README:end

		// What a scrape shows while a lock is held.
		lk, err := locker.Lock(ctx, pglocks.ID(1), pglocks.Label("migrations"))
		if err != nil {
			return err
		}
		defer lk.Release(ctx)
		w := httptest.NewRecorder()
		http.DefaultServeMux.ServeHTTP(w, httptest.NewRequest("GET", "/metrics", nil))
		scope := regexp.MustCompile(`\{(otel_scope_[a-z_]+="[^"]*",)+`)
		for _, line := range strings.Split(w.Body.String(), "\n") {
			if strings.HasPrefix(line, "pglocks_acquire_duration_seconds_count") || strings.HasPrefix(line, "pglocks_locks_held") {
				fmt.Println(scope.ReplaceAllString(line, "{…,"))
			}
		}
		return nil
	}()
	fmt.Println(err)
	// Output:
	// pglocks_acquire_duration_seconds_count{…,pglocks_acquire_outcome="acquired",pglocks_acquire_type="wait",pglocks_lock_label="migrations",pglocks_lock_mode="exclusive"} 1
	// pglocks_locks_held{…,pglocks_lock_mode="exclusive"} 1
	// pglocks_locks_held{…,pglocks_lock_mode="shared"} 0
	// <nil>
}
