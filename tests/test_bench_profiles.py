"""bench.profiles reads perf's report of a process's CPU by binary."""

from __future__ import annotations

from bench.profiles import dso_shares

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
