"""Federated analytics through executors: simulation backends, SecAgg+, the CLI, and real
``pollinate server`` / ``pollinate client`` processes over gRPC."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest

from pollinate.analytics import Policy, PrivacySession, Query, demo_tables, load_tables
from pollinate.analytics.config import load as load_analytics
from pollinate.analytics.runner import QUERY, QueryRunner, TableClient, TableClientFn
from pollinate.analytics.session import format_table
from pollinate.experiment import run_analytics
from pollinate.privacy.secagg import SecAggConfig
from pollinate.privacy.secure import SecureAggregation, SecureClient
from pollinate.simulation.engine import SimulationExecutor, make_backend
from pollinate.types import QueryRes
from tests.waiting import patience

REPO = Path(__file__).resolve().parents[1]
DEMO = REPO / "examples" / "diabetes-analytics.toml"

QUERIES = [
    Query("count", name="n"),
    Query("sum", "s1", name="sum_s1", where="age >= 40 and sex == 2"),
    Query("mean", "bmi", name="mean_bmi", group_by="sex", groups=(1, 2)),
    Query("var", "bp", name="var_bp", where="not (target < 100)"),
    Query("std", "age", name="std_age", group_by="sex", groups=(1, 2)),
    Query("cov", "bmi", column2="target", name="cov"),
    Query("corr", "s5", column2="target", name="corr", where="sex in (1, 2)"),
    Query("histogram", "bmi", name="hist", bins=(15, 20, 25, 30, 35, 40, 45)),
    Query("quantile", "target", name="q", quantiles=(0.5, 0.9), bounds=(0, 400)),
]


def _expected(whole: pd.DataFrame, q: Query) -> Any:
    """pandas on the union of the clients' tables."""
    df = whole
    if q.name == "sum_s1":
        return df[(df.age >= 40) & (df.sex == 2)].s1.sum()
    if q.name == "n":
        return len(df)
    if q.name == "mean_bmi":
        return {str(g): df[df.sex == g].bmi.mean() for g in (1, 2)}
    if q.name == "var_bp":
        return df[~(df.target < 100)].bp.var()
    if q.name == "std_age":
        return {str(g): df[df.sex == g].age.std() for g in (1, 2)}
    if q.name == "cov":
        return df.bmi.cov(df.target)
    if q.name == "corr":
        return df.s5.corr(df.target)
    if q.name == "hist":
        return np.histogram(df.bmi, bins=list(q.bins or ()))[0].tolist()
    if q.name == "q":
        return {str(p): df.target.quantile(p, interpolation="lower") for p in (0.5, 0.9)}
    raise AssertionError(q.name)


def _check(record: dict[str, Any], expected: Any, q: Query, rel: float = 1e-9) -> None:
    """``rel``: 1e-9 for float sums; SecAgg+ sums are exact up to its quantization grid
    (clip_range 1e9 over 2^52 levels: 4.4e-7 per client and coordinate)."""
    value = record["value"]
    if q.statistic == "histogram":
        assert value["counts"] == expected
    elif q.statistic == "quantile":
        for p, v in expected.items():
            assert abs(value[p] - v) <= record["accuracy"] + 1e-9
    elif isinstance(expected, dict):
        for g, v in expected.items():
            assert value[g] == pytest.approx(v, rel=rel)
    else:
        assert value == pytest.approx(expected, rel=rel)


def _runner(tables: list[pd.DataFrame], backend: str, secure: bool, **kw: Any):
    engine = make_backend(backend, workers=2)
    fn: Any = TableClientFn(tables, kw.pop("policy", None))
    if secure:
        fn = SecureClient(fn)
    engine.start(fn)
    executor = SimulationExecutor(engine, deterministic=True)
    config = SecAggConfig(
        neighbours=1.0, threshold=0.6, clip_range=1e9, quantization_bits=52, modulus_bits=64
    )
    runner = QueryRunner(executor, secure=SecureAggregation(config) if secure else None, **kw)
    return engine, runner


@pytest.mark.parametrize(
    "backend, secure", [("sequential", False), ("process", False), ("sequential", True)]
)
def test_every_statistic_equals_pandas_over_an_executor(backend: str, secure: bool) -> None:
    tables = demo_tables()
    whole = pd.concat(tables, ignore_index=True)
    engine, runner = _runner(tables, backend, secure)
    try:
        for q in QUERIES:
            record = runner.run(q, list(range(len(tables))))
            assert record["answered"] == list(range(8)) and record["refused"] == {}
            assert record["secure_aggregation"] is secure
            _check(record, _expected(whole, q), q, rel=1e-6 if secure else 1e-9)
    finally:
        engine.close()


def test_refusals_are_recorded_and_the_rest_answer() -> None:
    tables = demo_tables()
    policy = Policy(exposed=frozenset({"age", "sex", "bmi"}), min_group_size=1)
    engine, runner = _runner(tables, "sequential", False, policy=policy)
    try:
        hidden = runner.run(Query("mean", "target", name="t"), list(range(8)))
        assert hidden["value"] is None and len(hidden["refused"]) == 8
        assert all("does not expose" in why for why in hidden["refused"].values())
        assert "no client answered" in hidden["reason"]
        ok = runner.run(Query("mean", "age", name="a"), list(range(8)))
        assert ok["value"] == pytest.approx(pd.concat(tables).age.mean())
    finally:
        engine.close()


def test_small_cells_are_refused_by_the_holders_that_have_them() -> None:
    tables = demo_tables()
    engine, runner = _runner(tables, "sequential", True, policy=Policy(min_group_size=3))
    try:
        q = Query("std", "bp", name="bp", group_by="sex", groups=(1, 2))
        record = runner.run(q, list(range(8)))
        refused = {int(c) for c in record["refused"]}
        assert refused and len(refused) < 8
        assert all("minimum of 3 rows" in why for why in record["refused"].values())
        kept = pd.concat([t for i, t in enumerate(tables) if i not in refused])
        for g in (1, 2):  # the answer is over the holders that answered, through SecAgg+
            assert record["value"][str(g)] == pytest.approx(kept[kept.sex == g].bp.std())
        assert sorted(record["answered"]) == sorted(set(range(8)) - refused)
    finally:
        engine.close()


def test_the_budget_refuses_the_query_that_would_exceed_it() -> None:
    tables = demo_tables()
    session = PrivacySession(max_epsilon=1.6, delta=1e-6)  # ε 1.0, 1.45, then 1.81
    engine, runner = _runner(tables, "sequential", False, session=session, seed=0)
    q = Query("mean", "bmi", name="m", bounds=(15, 50), epsilon=1.0)
    try:
        first, second = (runner.run(q, list(range(8))) for _ in range(2))
        third = runner.run(q, list(range(8)))
    finally:
        engine.close()
    assert first["epsilon"] < second["epsilon"] <= 1.6
    assert third["value"] is None and "privacy budget" in third["reason"]
    assert third["answered"] == []  # no client was asked
    assert first["value"] == pytest.approx(pd.concat(tables).bmi.mean(), abs=2.0)
    assert first["dp"]["noise_multiplier"] > 0


def test_a_table_client_refuses_malformed_queries() -> None:
    client = TableClient(demo_tables()[0])
    for bad in (
        "{not json",
        json.dumps(
            {"statistic": "mean", "column": "age", "where": "__import__('os').system('id')"}
        ),
    ):
        with pytest.raises(Exception) as info:
            client.query([], {QUERY: bad})
        assert type(info.value).__name__ in ("ConfigError", "FilterError")
    res = client.query([], {QUERY: Query("count").to_json()})
    assert isinstance(res, QueryRes) and res.arrays[0][0] == len(demo_tables()[0])


def test_non_finite_numbers_in_an_analytics_config_are_refused() -> None:
    from pollinate.errors import ConfigError

    for override, key in (("privacy.delta=nan", "privacy.delta"), ("data.alpha=inf", "data.alpha")):
        with pytest.raises(ConfigError, match=f"{key} must be a finite number"):
            load_analytics(DEMO, [override])


def test_analyze_writes_answers_and_plots(tmp_path: Path) -> None:
    cfg = load_analytics(DEMO, [f"run.output={tmp_path / 'out'}"])
    answers = run_analytics(cfg, quiet=True)
    saved = json.loads((tmp_path / "out" / "analytics.json").read_text())
    assert [a["query"] for a in saved["answers"]] == [q.name for q in cfg.queries]
    assert saved["answers"] == json.loads(json.dumps(answers))
    assert (tmp_path / "out" / "bmi_histogram.png").stat().st_size > 1000
    whole = pd.concat(demo_tables(), ignore_index=True)
    by_name = {a["query"]: a for a in answers}
    high = whole[(whole.target > 150) & (whole.bmi >= 30)]
    assert by_name["mean_age_high_progression"]["value"] == pytest.approx(high.age.mean())
    assert by_name["mean_age_high_progression"]["rows"] == len(high)
    assert by_name["noisy_mean_bmi"]["epsilon"] == pytest.approx(1.0, abs=0.05)
    assert "mean_age_high_progression" in format_table(answers)


@pytest.mark.slow
def test_pollinate_analyze_cli(tmp_path: Path) -> None:
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "pollinate.cli",
            "analyze",
            str(DEMO),
            "--set",
            f"run.output={tmp_path / 'out'}",
            "--set",
            "secure_aggregation.enabled=true",
        ],
        capture_output=True,
        text=True,
        timeout=patience(300),
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr
    assert "mean_age_high_progression" in proc.stdout and "442" in proc.stdout
    answers = json.loads((tmp_path / "out" / "analytics.json").read_text())["answers"]
    assert all(a["secure_aggregation"] for a in answers)
    bad = subprocess.run(
        [sys.executable, "-m", "pollinate.cli", "analyze", str(DEMO), "--set", "data.bogus=1"],
        capture_output=True,
        text=True,
        timeout=patience(120),
        cwd=tmp_path,
    )
    assert bad.returncode == 2 and "unknown key data.bogus" in bad.stderr


@pytest.mark.slow
def test_analytics_over_grpc_with_real_client_processes(tmp_path: Path) -> None:
    from tests.test_deploy import Cluster, free_port

    config = tmp_path / "analytics.toml"
    text = DEMO.read_text().replace("num_clients = 8", "num_clients = 4")
    text = text.replace('output = "runs/diabetes-analytics"', 'output = "out"')
    text += '\n[[query]]\nname = "mean_s5"\nstatistic = "mean"\ncolumn = "s5"\n'
    config.write_text(
        text + "\n[secure_aggregation]\nenabled = true\nneighbours = 3\nthreshold = 2\n"
    )
    cluster = Cluster(tmp_path)  # output goes to files: a full pipe would block a process
    try:
        assert cluster.cli("certs", "certs").returncode == 0
        assert cluster.cli("keys", "certs", "0", "1", "2", "3").returncode == 0
        port = free_port()
        server = cluster.start(
            "server", "server", str(config), "--address", f"127.0.0.1:{port}", "--certs", "certs"
        )
        clients = []
        for i in range(4):
            extra = ["--expose", "age,sex,bmi,bp,target"] if i == 3 else []  # hides s1..s6
            clients.append(
                cluster.start(
                    f"client{i}",
                    "client",
                    "--server",
                    f"127.0.0.1:{port}",
                    "--config",
                    str(config),
                    "--partition",
                    str(i),
                    "--certs",
                    "certs",
                    *extra,
                )
            )
        assert server.wait(timeout=patience(300)) == 0, cluster.log("server")
        for i, c in enumerate(clients):  # told the session is over, clients stop by themselves
            assert c.wait(timeout=patience(60)) == 0, cluster.log(f"client{i}")
    finally:
        cluster.stop_all()
    answers = {
        a["query"]: a for a in json.loads((tmp_path / "out/analytics.json").read_text())["answers"]
    }
    tables = load_tables("diabetes", 4, "dirichlet", 0, partition_by="sex", alpha=0.5)
    whole = pd.concat(tables, ignore_index=True)
    assert answers["patients"]["value"] == len(whole) == 442
    assert answers["corr_bmi_progression"]["value"] == pytest.approx(
        whole.bmi.corr(whole.target), rel=1e-6
    )
    assert all(a["secure_aggregation"] for a in answers.values())
    assert "mean_age_high_progression" in cluster.log("server")
    s5 = answers["mean_s5"]  # client 3 does not expose s5: it refused mid-protocol
    assert s5["answered"] == [0, 1, 2] and "does not expose" in s5["refused"]["3"]
    kept = pd.concat(tables[:3])
    assert s5["value"] == pytest.approx(kept.s5.mean(), rel=1e-6)


def test_readme_shows_what_the_demo_prints(tmp_path: Path) -> None:
    readme = (REPO / "README.md").read_text()
    block = readme.split("pollinate analyze examples/diabetes-analytics.toml\n```\n\n```\n")[1]
    shown = block.split("```")[0].splitlines()
    cfg = load_analytics(DEMO, [f"run.output={tmp_path}"])
    printed = format_table(run_analytics(cfg, quiet=True)).splitlines()
    exact = [line for line in shown if not line.startswith("noisy_")]  # noise differs
    assert exact == [line for line in printed[: len(shown)] if not line.startswith("noisy_")]


def test_groups_are_discovered_when_the_query_lists_none(tmp_path: Path) -> None:
    lines = DEMO.read_text().splitlines(keepends=True)
    first = next(i for i, line in enumerate(lines) if line.startswith("groups = [1, 2]"))
    text = "".join(lines[:first] + lines[first + 1 :])  # bmi_histogram lists no groups
    config = tmp_path / "a.toml"
    config.write_text(text)
    cfg = load_analytics(config, [f"run.output={tmp_path}", "secure_aggregation.enabled=true"])
    assert cfg.discover == {"bmi_histogram"}
    assert "groups" not in cfg.to_dict()["query"][2]
    answers = {a["query"]: a for a in run_analytics(cfg, quiet=True)}
    hist = answers["bmi_histogram"]
    assert hist["groups_discovered"] and hist["groups"] == [1, 2]
    whole = pd.concat(demo_tables(), ignore_index=True)
    for g in (1, 2):
        expected = np.histogram(whole[whole.sex == g].bmi, bins=[15, 20, 25, 30, 35, 40, 45])[0]
        assert hist["value"][str(g)]["counts"] == expected.tolist()
    strict = load_analytics(config, [f"run.output={tmp_path}", "privacy.require_dp=true"])
    refused = {a["query"]: a for a in run_analytics(strict, quiet=True)}["bmi_histogram"]
    assert refused["value"] is None and "list the groups" in refused["reason"]


def test_a_secure_table_client_answers_only_empty_results_in_the_clear() -> None:
    from pollinate.analytics.runner import DISCOVER
    from pollinate.client import ClientContext
    from pollinate.privacy.secagg import SecAggError

    client = SecureClient(TableClientFn(demo_tables()))(ClientContext(0, 0))
    listed = client.query([], {DISCOVER: "sex"})  # group values: no sums, nothing to mask
    assert json.loads(str(listed.metrics["groups"])) == [1, 2]
    with pytest.raises(SecAggError, match="only through secure aggregation"):
        client.query([], {QUERY: Query("count").to_json()})  # a sum: never in the clear


class _Liar:
    """Answers every query with something that cannot be added up."""

    def __init__(self, ctx: Any) -> None:
        self.cid = ctx.client_id

    def query(self, arrays: Any, config: Any) -> QueryRes:
        bad = [np.zeros(3), np.full(2, np.nan), np.zeros((1, 2))][self.cid % 3]
        return QueryRes([bad], 0, {})


class _Mixed:
    """Clients 0-2 lie, the others answer honestly from the demo tables."""

    def __init__(self) -> None:
        self.honest = TableClientFn(demo_tables())

    def __call__(self, ctx: Any) -> Any:
        return _Liar(ctx) if ctx.client_id < 3 else self.honest(ctx)


def test_malformed_answers_are_refused_and_the_rest_counted() -> None:
    engine = make_backend("sequential")
    engine.start(_Mixed())
    try:
        runner = QueryRunner(SimulationExecutor(engine))
        record = runner.run(Query("mean", "age", name="a"), list(range(8)))
    finally:
        engine.close()
    assert record["answered"] == [3, 4, 5, 6, 7]
    reasons = record["refused"]
    assert "shape (3,)" in reasons["0"] and "NaN" in reasons["1"] and "shape (1, 2)" in reasons["2"]
    honest = pd.concat(demo_tables()[3:])
    assert record["value"] == pytest.approx(honest.age.mean())
