"""The scale-out figures script: the runs it asks runtime.loadtest for, and what it makes of the results."""

from runtime import loadtest, scaleout_loadtest


def fake_row(mode: str, clients: int, ttft_p50: float) -> dict:
    return {"mode": mode, "case": "plain", "clients": clients, "requests": 24, "errors": 0, "tokens_per_second": 50.0,
            "ttft_ms": {"p50": ttft_p50, "p99": ttft_p50 * 2}}


def test_it_asks_loadtest_for_the_three_servers():
    args = scaleout_loadtest.build_parser().parse_args(["engine-x", "--server-args", "--max-batch 8"])
    parsed = loadtest.parse_args(scaleout_loadtest.loadtest_argv(args, scaleout_loadtest.MODES, "1,8,16", 2, "o.json"))
    assert [name for name, _ in parsed.mode_list] == ["single", "ray-1x2", "ray-2x1"]
    assert dict(parsed.mode_list)["ray-2x1"] == ["--replicas", "2", "--threads", "1"]
    assert parsed.clients == [1, 8, 16] and parsed.system_tokens == 0 and parsed.server_args == "--max-batch 8"
    for single, ray in scaleout_loadtest.HOP_PAIRS.values():  # the same threads on both sides
        assert single.split()[-2:] == ray.split()[-2:] and "--replicas" in ray


def test_it_reads_the_table_and_the_hop():
    rows = [fake_row(mode, clients, 100.0 + clients) for mode in scaleout_loadtest.MODES for clients in (1, 8, 16)]
    assert scaleout_loadtest.table(rows)["ray-2x1"][16] == {"tok/s": 50.0, "TTFT p50": 116.0, "TTFT p99": 232.0,
                                                            "errors": 0}
    hop = scaleout_loadtest.hop_figures({"single": [0.110, 0.120, 0.130], "ray": [0.119, 0.127, 0.200]})
    assert round(hop["added_ms"], 6) == 7.0 and hop["requests"] == 3
    assert scaleout_loadtest.hop_figures({"single": [], "ray": [0.1]})["added_ms"] is None
