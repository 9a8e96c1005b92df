#!/usr/bin/env bash
# Issue 23's figures: B1 (pgx, database/sql through pgx's stdlib and lib/pq),
# B2 and B3 beside raw, five alternating rounds of one test binary.
#   bash bench/issue23/run.sh > bench/issue23/rounds.txt
set -euo pipefail
cd "$(dirname "$0")/../.."
go test -c -o /tmp/pglocks-bench.test .
for round in 1 2 3 4 5; do
	echo "# round $round"
	/tmp/pglocks-bench.test -test.run '^$' -test.bench 'Uncontended|Handover$|ParallelKeys' -test.benchmem -test.count 1 |
		grep '^Benchmark'
done
# The curve, three alternating rounds (raw and pglocks in each):
#   for r in 1 2 3; do /tmp/pglocks-bench.test -test.run '^$' -test.bench Scaling -test.count 1 | grep '^Benchmark'; done
