"""Instructions per connection of servers under callgrind.

    python bench/callgrind_per_conn.py SERVER[,SERVER...] SCENARIO[,SCENARIO...] [N]

With one server and one scenario it prints one line; with more, a
Markdown table (a row per server, a column per scenario).

Starts ``python -m fastlisten.benchmark.serve SERVER SCENARIO`` under
``valgrind --tool=callgrind`` with collection off, switches it on
(``callgrind_control -i on``), sends N connections (16 at a time) from this
process's load generator, dumps, stops the server, and prints the
instructions counted divided by N.  Instruction counts are repeatable on a
noisy machine where CPU times are not; the dump (``callgrind.out.*`` in the
current directory, or $CALLGRIND_DIR) is there for callgrind_annotate.
"""

from __future__ import annotations

import glob
import os
import re
import subprocess
import sys

from fastlisten.benchmark.loadgen import run_load


def measure(server: str, scenario: str, n: int) -> float:
    """Instructions per completed connection of server in scenario."""
    outdir = os.environ.get("CALLGRIND_DIR", ".")
    out = os.path.join(outdir, f"callgrind.out.{server}.{scenario}")
    for old in glob.glob(out + "*"):
        os.remove(old)
    proc = subprocess.Popen(
        ["valgrind", "--tool=callgrind", "--instr-atstart=no", f"--callgrind-out-file={out}",
         sys.executable, "-m", "fastlisten.benchmark.serve", server, scenario],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        line = proc.stdout.readline()
        port = int(line.split()[1])
        # warm-up: threads started, caches filled, outside the count
        run_load(("127.0.0.1", port), scenario, concurrency=16, total=200, duration=60,
                 timeout=30)
        subprocess.run(["callgrind_control", "-i", "on", str(proc.pid)], check=True,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        res = run_load(("127.0.0.1", port), scenario, concurrency=16, total=n, duration=120,
                       timeout=30)
        subprocess.run(["callgrind_control", "-i", "off", str(proc.pid)], check=True,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        proc.stdin.write("stop\n")
        proc.stdin.flush()
        proc.wait(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    total = 0
    for path in glob.glob(out + "*"):
        report = subprocess.run(["callgrind_annotate", path], capture_output=True, text=True)
        m = re.search(r"^\s*([\d,]+) .*PROGRAM TOTALS", report.stdout, re.M)
        if m:
            total += int(m.group(1).replace(",", ""))
    done = res.completed
    print(f"{server} {scenario}: {done} connections ({res.errors} errors, {res.timeouts} timeouts), "
          f"{total / max(done, 1):,.0f} instructions/connection", file=sys.stderr)
    return total / max(done, 1)


def main() -> int:
    servers, scenarios = sys.argv[1].split(","), sys.argv[2].split(",")
    n = int(sys.argv[3]) if len(sys.argv) > 3 else 2000
    table = {(srv, sc): measure(srv, sc, n) for srv in servers for sc in scenarios}
    if len(table) == 1:
        return 0
    print("| server | " + " | ".join(scenarios) + " |")
    print("|:---|" + "---:|" * len(scenarios))
    for srv in servers:
        print(f"| {srv} | " + " | ".join(f"{table[srv, sc] / 1000:,.1f} k" for sc in scenarios) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
