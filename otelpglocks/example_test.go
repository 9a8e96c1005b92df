package otelpglocks_test

import (
	"context"
	"log"
	"net/http"
	"os"

	"github.com/jackc/pgx/v5/pgxpool"
	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/promhttp"
	otelprom "go.opentelemetry.io/otel/exporters/prometheus"
	sdkmetric "go.opentelemetry.io/otel/sdk/metric"

	"github.com/pglocks/pglocks"
	"github.com/pglocks/pglocks/otelpglocks"
)

// Serve the Lockers' metrics to Prometheus through OpenTelemetry's
// Prometheus exporter, at /metrics.
func Example_prometheus() {
	reg := prometheus.NewRegistry()
	exp, err := otelprom.New(otelprom.WithRegisterer(reg))
	if err != nil {
		log.Fatal(err)
	}
	mp := sdkmetric.NewMeterProvider(sdkmetric.WithReader(exp))
	t, err := otelpglocks.New(otelpglocks.WithMeterProvider(mp))
	if err != nil {
		log.Fatal(err)
	}

	ctx := context.Background()
	pool, err := pgxpool.New(ctx, os.Getenv("DATABASE_URL"))
	if err != nil {
		log.Fatal(err)
	}
	defer pool.Close()
	l, err := pglocks.New(pool, pglocks.WithTracer(t))
	if err != nil {
		log.Fatal(err)
	}
	defer l.Close()

	http.Handle("/metrics", promhttp.HandlerFor(reg, promhttp.HandlerOpts{}))
	go func() { log.Fatal(http.ListenAndServe("localhost:9464", nil)) }()

	// Metrics carry the label, never the key.
	err = l.Do(ctx, pglocks.Name("nightly-report"), func(ctx context.Context) error {
		return nil // the report
	}, pglocks.Label("nightly-report"))
	if err != nil {
		log.Print(err)
	}
}
