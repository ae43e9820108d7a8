"""bench.profiles reads perf's report of a process's CPU by binary."""

from __future__ import annotations

import sys
import time
from pathlib import Path

from bench.profiles import _sampling, dso_shares

# What `perf report --stdio --no-children -g none --sort dso` printed for agentd on Redis.
REPORT = """\
# To display the perf.data header info, please use --header/--header-only options.
#
#
# Total Lost Samples: 0
#
# Samples: 13K of event 'cpu-clock'
# Event count (approx.): 6628500000
#
# Overhead  Shared Object
# ........  ............................................
#
    71.40%  libpython3.11.so.1.0
    22.30%  [kernel.kallsyms]
     3.72%  libc.so.6
     0.86%  orjson.cpython-311-x86_64-linux-gnu.so
     0.29%  hiredis.cpython-311-x86_64-linux-gnu.so
     0.26%  [vdso]


#
# (Tip: Use parent filter to see specific call path: perf report -p <regex>)
#
"""


def test_perf_report_rows_become_named_shares() -> None:
    assert dso_shares(REPORT) == [
        ("libpython3.11", 71.4),
        ("kernel", 22.3),
        ("libc", 3.72),
        ("orjson", 0.86),
        ("hiredis", 0.29),
        ("[vdso]", 0.26),
    ]


def test_a_report_without_samples_has_no_rows() -> None:
    assert dso_shares("# Samples: 0  of event 'cpu-clock'\n#\n") == []


# A stand-in sampler that takes its time to start, as py-spy does, then says so on stdout, and
# writes its file only if it sampled at all before SIGINT.
SLOW_SAMPLER = """\
import signal, sys, time
out = sys.argv[1]
sampling = []
def stop(*_):
    if sampling:
        open(out, "w").write("stack 1\\n")
    sys.exit(0)
signal.signal(signal.SIGINT, stop)
time.sleep(0.5)
sampling.append(True)
print("py-spy> Sampling process 500 times a second. Press Control-C to exit.", flush=True)
while True:
    time.sleep(0.01)
"""


def test_a_block_starts_once_the_sampler_samples_so_even_an_empty_one_is_recorded(
    tmp_path: Path,
) -> None:
    out = tmp_path / "profile.txt"
    argv = [sys.executable, "-c", SLOW_SAMPLER, str(out)]
    started = time.monotonic()
    with _sampling(argv, out, "nothing sampled", ready=b"py-spy> Sampling"):
        waited = time.monotonic() - started
    assert waited >= 0.5
    assert out.read_text() == "stack 1\n"
