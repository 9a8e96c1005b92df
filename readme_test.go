package pglocks_test

import (
	"bytes"
	"context"
	"fmt"
	"go/ast"
	"go/doc"
	"go/parser"
	"go/token"
	"io/fs"
	"log"
	"os"
	"path/filepath"
	"strings"
	"sync/atomic"
	"testing"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgxpool"

	"github.com/pglocks/pglocks"
)

// The markers around a README snippet in a test file: each on a line of its
// own, in the function that runs the snippet.
const (
	readmeBegin = "// README:begin"
	readmeEnd   = "// README:end"
)

// A readmeBlock is a ```go block of README.md.
type readmeBlock struct {
	line int // of its opening fence
	text string
}

// A readmeRegion is the code between the markers in a test file.
type readmeRegion struct {
	fn   string // the function it is in
	pos  string // file:line of its first line of code
	text string
}

// Every ```go block of README.md is, but for indentation, the code between
// the markers in an Example that runs (it has an Output comment) or in a
// Test, in this module or in an integration module of its own (gocronpglocks,
// cronpglocks, goosepglocks, otelpglocks, ...); and every such
// region is a block of README.md. So the README's code compiles and runs
// with the tests, and cannot drift from it.
func TestREADMESnippets(t *testing.T) {
	src, err := os.ReadFile("README.md")
	if err != nil {
		t.Fatal(err)
	}
	blocks := readmeGoBlocks(src)
	if len(blocks) == 0 {
		t.Fatal("README.md has no ```go block")
	}
	regions, err := readmeRegions(".")
	if err != nil {
		t.Fatal(err)
	}
	inREADME := map[string]bool{}
	for _, b := range blocks {
		inREADME[b.text] = true
	}
	inTests := map[string]bool{}
	for _, r := range regions {
		inTests[r.text] = true
	}
	reported := map[string]bool{} // blocks shown with their closest region
	for _, b := range blocks {
		if inTests[b.text] {
			continue
		}
		reported[b.text] = true
		if len(regions) == 0 {
			t.Errorf("README.md:%d: this ```go block is in no test: there are no %q ... %q regions", b.line, readmeBegin, readmeEnd)
			continue
		}
		r := regions[0]
		for _, c := range regions[1:] {
			if commonLines(c.text, b.text) > commonLines(r.text, b.text) {
				r = c
			}
		}
		t.Errorf("README.md:%d: this ```go block is in no test; the closest is %s at %s (- test, + README):\n%s",
			b.line, r.fn, r.pos, lineDiff(r.text, b.text))
	}
	for _, r := range regions {
		if inREADME[r.text] {
			continue
		}
		b := blocks[0]
		for _, c := range blocks[1:] {
			if commonLines(c.text, r.text) > commonLines(b.text, r.text) {
				b = c
			}
		}
		if reported[b.text] {
			continue
		}
		t.Errorf("%s: the README region of %s is no ```go block of README.md; the closest is at README.md:%d (- test, + README):\n%s",
			r.pos, r.fn, b.line, lineDiff(r.text, b.text))
	}
}

// The check holds to its rules: a region runs, and is closed in the
// function it was opened in; its indentation does not count.
func TestREADMERegionRules(t *testing.T) {
	for _, tt := range []struct {
		name, src string
		want      string // the region's text, or the error's start
	}{
		{"example with output", `package p
func Example() {
	func() {
		// README:begin
		if true {
			fmt.Println(1)
		}
		// README:end
	}()
	// Output: 1
}`, "if true {\n\tfmt.Println(1)\n}"},
		{"test", `package p
func TestX(t *testing.T) {
	// README:begin
	fmt.Println(1)
	// README:end
}`, "fmt.Println(1)"},
		{"example without output", `package p
func Example() {
	// README:begin
	fmt.Println(1)
	// README:end
}`, "x_test.go:3:2: " + readmeBegin + " is in Example, which does not run"},
		{"helper", `package p
func helper() {
	// README:begin
	fmt.Println(1)
	// README:end
}`, "x_test.go:3:2: " + readmeBegin + " is in helper, which does not run"},
		{"not closed", `package p
func TestX(t *testing.T) {
	// README:begin
	fmt.Println(1)
}`, "x_test.go:3:2: " + readmeBegin + " without " + readmeEnd},
		{"closed elsewhere", `package p
func TestX(t *testing.T) {
	// README:begin
}
func TestY(t *testing.T) {
	// README:end
}`, "x_test.go:3:2: " + readmeBegin + " and " + readmeEnd + " are in different functions"},
	} {
		t.Run(tt.name, func(t *testing.T) {
			rs, err := fileRegions("x_test.go", []byte(tt.src))
			got := ""
			switch {
			case err != nil:
				got = err.Error()
			case len(rs) != 1:
				t.Fatalf("got %d regions, want 1", len(rs))
			default:
				got = rs[0].text
			}
			if !strings.HasPrefix(got, tt.want) {
				t.Errorf("got %q, want %q", got, tt.want)
			}
		})
	}
}

// readmeGoBlocks returns the ```go blocks of a Markdown text.
func readmeGoBlocks(md []byte) []readmeBlock {
	var blocks []readmeBlock
	var code []string
	start := 0 // 0: outside a block
	for i, line := range strings.Split(string(md), "\n") {
		line = strings.TrimRight(line, " \t\r")
		switch {
		case start == 0 && line == "```go":
			start, code = i+1, nil
		case start != 0 && line == "```":
			blocks = append(blocks, readmeBlock{start, normalizeSnippet(code)})
			start = 0
		case start != 0:
			code = append(code, line)
		}
	}
	return blocks
}

// readmeRegions returns the README regions of the test files under root.
func readmeRegions(root string) ([]readmeRegion, error) {
	var regions []readmeRegion
	err := filepath.WalkDir(root, func(path string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		if d.IsDir() {
			if path != root && (strings.HasPrefix(d.Name(), ".") || d.Name() == "testdata") {
				return filepath.SkipDir
			}
			return nil
		}
		if !strings.HasSuffix(path, "_test.go") {
			return nil
		}
		src, err := os.ReadFile(path)
		if err != nil {
			return err
		}
		// Other files are not parsed, so that one being edited does not
		// fail this test.
		if !bytes.Contains(src, []byte(readmeBegin)) {
			return nil
		}
		rs, err := fileRegions(path, src)
		regions = append(regions, rs...)
		return err
	})
	return regions, err
}

// fileRegions returns the README regions of one test file. Each must be in
// a Test, or in an Example that runs.
func fileRegions(path string, src []byte) ([]readmeRegion, error) {
	fset := token.NewFileSet()
	f, err := parser.ParseFile(fset, path, src, parser.ParseComments)
	if err != nil {
		return nil, err
	}
	runs := map[string]bool{}
	for _, ex := range doc.Examples(f) {
		runs["Example"+ex.Name] = ex.Output != "" || ex.EmptyOutput
	}
	lines := strings.Split(string(src), "\n")
	var regions []readmeRegion
	var open *ast.Comment
	for _, g := range f.Comments {
		for _, c := range g.List {
			fn, at := regionFunc(f, c), fset.Position(c.Pos())
			switch {
			case c.Text == readmeBegin && open != nil:
				return nil, fmt.Errorf("%s: %s again, before %s", at, readmeBegin, readmeEnd)
			case c.Text == readmeBegin && fn == "":
				return nil, fmt.Errorf("%s: %s outside a function", at, readmeBegin)
			case c.Text == readmeBegin && !strings.HasPrefix(fn, "Test") && !runs[fn]:
				return nil, fmt.Errorf("%s: %s is in %s, which does not run: make it an Example with an Output comment, or a Test", at, readmeBegin, fn)
			case c.Text == readmeBegin:
				open = c
			case c.Text == readmeEnd && open == nil:
				return nil, fmt.Errorf("%s: %s without %s", at, readmeEnd, readmeBegin)
			case c.Text == readmeEnd:
				from := fset.Position(open.Pos())
				if fn != regionFunc(f, open) {
					return nil, fmt.Errorf("%s: %s and %s are in different functions", from, readmeBegin, readmeEnd)
				}
				regions = append(regions, readmeRegion{
					fn:   fn,
					pos:  fmt.Sprintf("%s:%d", path, from.Line+1),
					text: normalizeSnippet(lines[from.Line : at.Line-1]),
				})
				open = nil
			}
		}
	}
	if open != nil {
		return nil, fmt.Errorf("%s: %s without %s", fset.Position(open.Pos()), readmeBegin, readmeEnd)
	}
	return regions, nil
}

// regionFunc returns the name of the function whose body holds c.
func regionFunc(f *ast.File, c *ast.Comment) string {
	for _, d := range f.Decls {
		if fd, ok := d.(*ast.FuncDecl); ok && fd.Body != nil && fd.Body.Pos() < c.Pos() && c.Pos() < fd.Body.End() {
			return fd.Name.Name
		}
	}
	return ""
}

// normalizeSnippet removes the indentation that all of lines share, trailing
// blanks and blank lines at either end.
func normalizeSnippet(lines []string) string {
	indent, found := "", false
	for _, l := range lines {
		if strings.TrimSpace(l) == "" {
			continue
		}
		lead := l[:len(l)-len(strings.TrimLeft(l, " \t"))]
		if !found {
			indent, found = lead, true
		}
		for !strings.HasPrefix(lead, indent) {
			indent = indent[:len(indent)-1]
		}
	}
	out := make([]string, len(lines))
	for i, l := range lines {
		out[i] = strings.TrimRight(strings.TrimPrefix(l, indent), " \t\r")
	}
	return strings.Trim(strings.Join(out, "\n"), "\n")
}

// lcs returns the table of the longest common subsequences of a[i:] and b[j:].
func lcs(a, b []string) [][]int {
	n := make([][]int, len(a)+1)
	for i := range n {
		n[i] = make([]int, len(b)+1)
	}
	for i := len(a) - 1; i >= 0; i-- {
		for j := len(b) - 1; j >= 0; j-- {
			if a[i] == b[j] {
				n[i][j] = n[i+1][j+1] + 1
			} else {
				n[i][j] = max(n[i+1][j], n[i][j+1])
			}
		}
	}
	return n
}

// commonLines says how alike two snippets are: the lines they share, in order.
func commonLines(a, b string) int {
	return lcs(strings.Split(a, "\n"), strings.Split(b, "\n"))[0][0]
}

// lineDiff shows how b differs from a, line by line.
func lineDiff(a, b string) string {
	x, y := strings.Split(a, "\n"), strings.Split(b, "\n")
	n := lcs(x, y)
	var out strings.Builder
	i, j := 0, 0
	for i < len(x) || j < len(y) {
		switch {
		case i < len(x) && j < len(y) && x[i] == y[j]:
			fmt.Fprintf(&out, "  %s\n", x[i])
			i, j = i+1, j+1
		case i < len(x) && (j == len(y) || n[i+1][j] >= n[i][j+1]):
			fmt.Fprintf(&out, "- %s\n", x[i])
			i++
		default:
			fmt.Fprintf(&out, "+ %s\n", y[j])
			j++
		}
	}
	return out.String()
}

// The Examples that run the README's code are given a database and what the
// code leaves to its reader, below.

var exampleSeq atomic.Int64

// exampleDB gives an Example a database of its own on the test server, with
// the setup statements run in it, and points DATABASE_URL at it, as the
// README's code expects; the log package meanwhile writes to the Example's
// output, without timestamps. done undoes it: it prints the advisory locks
// left in the database (failing the Example), then drops it.
func exampleDB(setup ...string) (dsn string, done func()) {
	ctx := context.Background()
	name := fmt.Sprintf("example_%d_%d", os.Getpid(), exampleSeq.Add(1))
	if _, err := srv.Admin.Exec(ctx, "CREATE DATABASE "+pgx.Identifier{name}.Sanitize()); err != nil {
		panic(err)
	}
	cfg, err := pgx.ParseConfig(srv.URL)
	if err != nil {
		panic(err)
	}
	dsn = fmt.Sprintf("postgres://%s@%s:%d/%s?sslmode=disable", cfg.User, cfg.Host, cfg.Port, name)
	for _, q := range setup {
		exampleQuery(dsn, q)
	}
	url, hadURL := os.LookupEnv("DATABASE_URL")
	os.Setenv("DATABASE_URL", dsn)
	logTo, logFlags := log.Writer(), log.Flags()
	log.SetOutput(os.Stdout)
	log.SetFlags(0)
	return dsn, func() {
		log.SetOutput(logTo)
		log.SetFlags(logFlags)
		if hadURL {
			os.Setenv("DATABASE_URL", url)
		} else {
			os.Unsetenv("DATABASE_URL")
		}
		left, err := srv.AdvisoryLocks(ctx, name)
		if err != nil {
			panic(err)
		}
		for _, l := range left {
			fmt.Println("left behind:", l)
		}
		if _, err := srv.Admin.Exec(ctx, "DROP DATABASE "+pgx.Identifier{name}.Sanitize()+" WITH (FORCE)"); err != nil {
			panic(err)
		}
	}
}

// exampleQuery runs q in the database of dsn and returns the first column of
// its first row ("" if it has none).
func exampleQuery(dsn, q string) string {
	ctx := context.Background()
	c, err := pgx.Connect(ctx, dsn)
	if err != nil {
		panic(err)
	}
	defer c.Close(ctx)
	rows, err := c.Query(ctx, q)
	if err != nil {
		panic(err)
	}
	defer rows.Close()
	var s string
	if rows.Next() {
		v, err := rows.Values()
		if err != nil {
			panic(err)
		}
		s = fmt.Sprint(v[0])
	}
	if err := rows.Err(); err != nil {
		panic(err)
	}
	return s
}

// exampleLocker returns a Locker made with opts, on a pool of its own in a
// database of exampleDB's, for README code that is handed one. done closes
// the Locker, then does exampleDB's done, then closes the pool.
func exampleLocker(opts ...pglocks.Option) (locker *pglocks.Locker, done func()) {
	dsn, dbDone := exampleDB()
	pool, err := pgxpool.New(context.Background(), dsn)
	if err != nil {
		panic(err)
	}
	locker, err = pglocks.New(pool, opts...)
	if err != nil {
		panic(err)
	}
	return locker, func() {
		if err := locker.Close(); err != nil {
			fmt.Println("Close:", err)
		}
		dbDone()
		pool.Close()
	}
}

// What the README's code calls, standing for its reader's own code.

func runReport(ctx context.Context) error {
	fmt.Println("report")
	return nil
}

func exportPart(ctx context.Context, part int) error {
	fmt.Println("exported part", part)
	return nil
}

func export(ctx context.Context) error {
	fmt.Println("export")
	return nil
}

func transfer(ctx context.Context, from, to int64) error {
	fmt.Printf("transfer %d -> %d\n", from, to)
	return nil
}
