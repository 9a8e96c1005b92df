// Chart reads `go test -bench` output and draws, as SVG, how pglocks
// compares with hand-written pgx in each benchmark (medians over -count
// runs). Lower cost is better, so each bar is raw's cost divided by
// pglocks' cost: above 1 means pglocks is faster.
//
//	go test -run '^$' -bench . -count 5 . > bench/results.txt
//	go run ./bench/chart < bench/results.txt > bench/chart.svg
//
// With -bench NAME it draws only that benchmark's rows (the goroutine curve:
// -bench Scaling).
package main

import (
	"bufio"
	"flag"
	"fmt"
	"io"
	"os"
	"slices"
	"strconv"
	"strings"
)

func main() {
	only := flag.String("bench", "", "draw only this benchmark's rows")
	flag.Parse()
	if *only != "" {
		comparisons = slices.DeleteFunc(comparisons, func(c comparison) bool { return c.bench != *only })
	}
	os.Exit(run(os.Stdin, os.Stdout, os.Stderr))
}

// comparison is one row: benchmark, the metric compared, the raw and
// pglocks sub-benchmarks, and what the bar means.
type comparison struct{ bench, metric, raw, pg, label string }

// comparisons are the rows drawn.
var comparisons = []comparison{
	{"Uncontended", "ns/op", "raw", "pglocks", "B1 uncontended Lock+Release"},
	{"Uncontended", "ns/op", "raw", "pglocks-nowait", "B1 with ReleaseNoWait"},
	{"Handover", "ns/op", "raw", "pglocks", "B2 hand-over cycle (8 sessions)"},
	{"ParallelKeys", "ns/op", "raw", "pglocks", "B3 32 goroutines, own keys (pglocks on 1-2 conns)"},
	{"ManyHeld", "ns/lock", "raw-one-round-trip-each", "pglocks", "B4 taking 10,000 locks"},
	{"ManyWaiters", "release-to-last-ms", "raw", "pglocks-freed-by-locker", "B7 1,000 waiters: release to last grant"},
	{"Scaling", "ns/op", "g=1/raw", "g=1/pglocks", "1 goroutine (pglocks: 1 conn, raw: 1)"},
	{"Scaling", "ns/op", "g=8/raw", "g=8/pglocks", "8 goroutines (raw: 8 conns)"},
	{"Scaling", "ns/op", "g=32/raw", "g=32/pglocks", "32 goroutines (raw: 32 conns)"},
	{"Scaling", "ns/op", "g=128/raw", "g=128/pglocks", "128 goroutines (raw: 128 conns)"},
	{"Scaling", "ns/op", "g=512/raw", "g=512/pglocks", "512 goroutines (raw: pool of 256)"},
}

func run(in io.Reader, out, errw io.Writer) int {
	values := map[string][]float64{} // "bench/sub metric" -> samples
	sc := bufio.NewScanner(in)
	for sc.Scan() {
		f := strings.Fields(sc.Text())
		if len(f) < 4 || !strings.HasPrefix(f[0], "Benchmark") {
			continue
		}
		name := strings.TrimPrefix(f[0], "Benchmark")
		if i := strings.LastIndex(name, "-"); i > 0 {
			name = name[:i] // the GOMAXPROCS suffix
		}
		for i := 2; i+1 < len(f); i += 2 {
			if v, err := strconv.ParseFloat(f[i], 64); err == nil {
				values[name+" "+f[i+1]] = append(values[name+" "+f[i+1]], v)
			}
		}
	}
	median := func(k string) (float64, bool) {
		v := slices.Clone(values[k])
		if len(v) == 0 {
			return 0, false
		}
		slices.Sort(v)
		return v[len(v)/2], true
	}
	const w, rowH, left = 760, 46, 330
	fmt.Fprintf(out, `<svg xmlns="http://www.w3.org/2000/svg" width="%d" height="%d" font-family="sans-serif" font-size="13">`+"\n", w, 60+rowH*len(comparisons))
	fmt.Fprintf(out, `<text x="10" y="22" font-size="15" font-weight="bold">pglocks vs hand-written pgx: raw cost ÷ pglocks cost (medians; &gt;1 = pglocks faster)</text>`+"\n")
	scale := 40.0 // px per 1x
	for i, c := range comparisons {
		raw, ok1 := median(c.bench + "/" + c.raw + " " + c.metric)
		pg, ok2 := median(c.bench + "/" + c.pg + " " + c.metric)
		if !ok1 || !ok2 || pg == 0 {
			// A run too short to measure it (CI's -benchtime 1x has no
			// hand-over to time): leave the row empty.
			fmt.Fprintf(errw, "chart: no %s %s in the input; row left empty\n", c.bench, c.metric)
			continue
		}
		ratio := raw / pg
		y := 45 + i*rowH
		fmt.Fprintf(out, `<text x="10" y="%d">%s</text>`+"\n", y+18, c.label)
		fmt.Fprintf(out, `<rect x="%d" y="%d" width="%.0f" height="24" fill="#4a7ebb"/>`+"\n", left, y, min(ratio*scale, w-left-60))
		fmt.Fprintf(out, `<text x="%.0f" y="%d">%.2fx</text>`+"\n", float64(left)+min(ratio*scale, w-left-60)+6, y+17, ratio)
	}
	fmt.Fprintf(out, `<line x1="%.0f" y1="38" x2="%.0f" y2="%d" stroke="#c33" stroke-dasharray="4"/>`+"\n", left+scale, left+scale, 45+rowH*len(comparisons))
	fmt.Fprintln(out, `</svg>`)
	return 0
}
