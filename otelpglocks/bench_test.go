package otelpglocks_test

import (
	"testing"

	sdkmetric "go.opentelemetry.io/otel/sdk/metric"
	sdktrace "go.opentelemetry.io/otel/sdk/trace"
	"go.opentelemetry.io/otel/sdk/trace/tracetest"

	"github.com/pglocks/pglocks"
	"github.com/pglocks/pglocks/internal/benchkit"
	"github.com/pglocks/pglocks/otelpglocks"
)

// What the OpenTelemetry tracer costs on B1 (one goroutine, Lock+Release
// of one key), beside the same Locker without a tracer, in the same run:
//
//	go test -run '^$' -bench . -count 6 . | tee otel.txt && benchstat otel.txt
//
// The tracer records into the SDK's meter provider (a manual reader) and a
// tracer provider that samples every span (to an exporter that drops
// them), as a service exporting both would.
func BenchmarkUncontended(b *testing.B) {
	b.Run("tracer=none", func(b *testing.B) {
		benchkit.Uncontended(b, benchkit.Pglocks(b, srv.DB(b), pglocks.ID(1)))
	})
	b.Run("tracer=otel", func(b *testing.B) {
		mp := sdkmetric.NewMeterProvider(sdkmetric.WithReader(sdkmetric.NewManualReader()))
		tp := sdktrace.NewTracerProvider(sdktrace.WithSpanProcessor(sdktrace.NewSimpleSpanProcessor(tracetest.NewNoopExporter())))
		tr, err := otelpglocks.New(otelpglocks.WithMeterProvider(mp), otelpglocks.WithTracerProvider(tp))
		if err != nil {
			b.Fatal(err)
		}
		benchkit.Uncontended(b, benchkit.Pglocks(b, srv.DB(b), pglocks.ID(1), pglocks.WithTracer(tr)))
	})
}
