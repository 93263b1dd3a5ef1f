"""Scaling out: a real Ray cluster by address, dead actors replaced, SIGINT and resume, shared Optuna studies."""

from __future__ import annotations

import dataclasses
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import optuna
import pytest
from quick_settings import PLANTED, QUICK

from tree_search.agents import OptunaSearcher
from tree_search.envs import TreeEnvConfig, load_env_dataset, make_env
from tree_search.search.runs import Run

CONFIG = TreeEnvConfig(dataset="planted", planted=PLANTED, train=QUICK, split_min_group=8)
CLI = [sys.executable, "-c", "from tree_search.cli import main; main()"]
SEARCH = ["search", "--dataset", "planted", "--baselines", "none", "--no-compare", "--epochs", "2"]
TOKEN = secrets.token_hex(32)


def environment(**extra: str) -> dict[str, str]:
    """The environment of a subprocess: this test's cache folder (set by the autouse fixture), unbuffered output."""
    return {**os.environ, "PYTHONUNBUFFERED": "1", **extra}


def cluster_environment() -> dict[str, str]:
    """Nodes and driver share one explicit token (Ray enables token auth by default; defaults could disagree)."""
    path = f"{Path(sys.executable).parent}:{os.environ['PATH']}"  # the venv's `ray`
    return environment(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=TOKEN, PATH=path)


PG_BIN = Path("/usr/lib/postgresql/15/bin")


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def counted(folder: Path) -> list[str]:
    return [e.key for e in Run(folder).evaluations() if e.counted]


def env_factory(dataset):
    return lambda reward_fn: make_env({"env": "split", **CONFIG.to_env_config()}, dataset=dataset, reward_fn=reward_fn)


@pytest.mark.slow
def test_search_on_a_two_node_ray_cluster_by_address(tmp_path):
    from ray.util import get_node_ip_address

    ip, port = get_node_ip_address(), free_port()
    address = f"{ip}:{port}"
    common = ["--num-cpus", "1", "--disable-usage-stats", "--block"]

    def launch(*args: str) -> subprocess.Popen:
        return subprocess.Popen(["ray", "start", *args, *common], start_new_session=True, env=cluster_environment(),
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip

    nodes = [launch("--head", "--port", str(port), "--include-dashboard", "false")]
    try:
        deadline = time.monotonic() + 60
        while True:  # wait for the head's GCS to listen
            with socket.socket() as probe:
                if probe.connect_ex((ip, port)) == 0:
                    break
            assert time.monotonic() < deadline, "the Ray head did not start"
            time.sleep(0.5)
        nodes.append(launch("--address", address))

        def search_on_cluster(out: Path, budget: int, *args: str) -> dict:
            """Run a search through the cluster; check its distinct counted trees; its evaluator counters."""
            result = subprocess.run(
                [*CLI, *SEARCH, *args, "--budget", str(budget), "--ray-address", address, "--out", str(out)],
                capture_output=True, text=True, env=cluster_environment(), timeout=300,
            )  # fmt: skip
            assert result.returncode == 0, result.stderr[-3000:]
            keys = counted(out)
            assert len(keys) == len(set(keys)) == budget
            return Run(out).read_json("evaluator.json")["sessions"][-1]

        stats = search_on_cluster(tmp_path / "cluster", 6, "--agent", "random", "--eval-workers", "2")
        assert stats["done"] + stats["failed"] == 6
        assert stats["workers"] == 2 and stats["nodes"] == 2  # one actor on each node (1 CPU each)
        # PPO's remote env runners, which reach the driver the same way from any node, are tested on one node
        # (`test_ppo_samples_in_remote_env_runners_that_score_through_the_driver`): here they took 55 of 77 s
    finally:
        for process in reversed(nodes):
            os.killpg(process.pid, signal.SIGTERM)
            process.wait(timeout=60)


def test_a_killed_evaluation_actor_is_replaced_and_every_evaluation_is_accounted_for(ray_session):
    import ray

    from tree_search.distributed.ray_evaluator import RayEvaluator

    dataset = load_env_dataset(CONFIG)
    killed = threading.Event()

    def kill_once(evaluation, tree):
        if not killed.is_set():
            killed.set()
            threading.Timer(0.05, lambda: ray.kill(evaluator.actors[0])).start()  # likely mid-evaluation

    evaluator = RayEvaluator(dataset, QUICK, budget=8, listeners=[kill_once], workers=1, max_retries=2)
    first = evaluator.actors[0]
    try:
        rows = list(OptunaSearcher("random", env_factory(dataset), evaluator, seed=1).search())
    finally:
        evaluator.close()
    assert len(rows) == 8 == len({r.key for r in rows}) and all(r.error is None for r in rows)  # some pruned
    stats = evaluator.stats()
    assert stats["done"] == 8 and stats["failed"] == 0
    assert stats["retried"] <= 1  # the kill hit an evaluation in flight (retried) or an idle actor (replaced)
    assert evaluator.actors[0] is not first  # the dead actor was replaced


def test_a_bug_in_an_evaluation_raises_in_the_driver_and_keeps_the_actor(ray_session):
    from tree_search.builders import huffman
    from tree_search.distributed.ray_evaluator import RayEvaluator

    dataset = load_env_dataset(CONFIG)
    evaluator = RayEvaluator(dataset, QUICK, workers=1, budget=1)
    try:
        tree = huffman(dataset.counts, 2)
        first = evaluator.actors[0]
        with pytest.raises(ValueError, match="projection 10000"):  # raised inside the actor, as its own type here
            evaluator.evaluate(tree, {10_000: 4})
        assert evaluator.remaining == 1 and evaluator.stats()["failed"] == 0  # nothing recorded, nothing spent
        assert evaluator.evaluate(tree).ok and evaluator.actors[0] is first  # the same actor serves the next one
    finally:
        evaluator.close()


def test_an_evaluation_actor_holds_numpy_blas_to_one_thread(ray_session):
    """Its idle BLAS threads would spin on the cores its torch threads train on (`reward.blas`)."""
    import ray

    from tree_search.distributed.ray_evaluator import EvaluationWorker

    def blas_threads(_actor) -> list[int]:
        from threadpoolctl import threadpool_info

        return [pool["num_threads"] for pool in threadpool_info() if pool["user_api"] == "blas"]

    # a process whose numpy starts two BLAS threads (the tests' OMP_NUM_THREADS=1 would otherwise give one)
    two = {"env_vars": {"OPENBLAS_NUM_THREADS": "2"}}
    plain = ray.remote(num_cpus=1)(type("Plain", (), {})).options(runtime_env=two).remote()
    worker = ray.remote(num_cpus=1)(EvaluationWorker).options(runtime_env=two).remote(load_env_dataset(CONFIG), 1)
    try:
        assert ray.get(plain.__ray_call__.remote(blas_threads)) == [2]
        assert ray.get(worker.__ray_call__.remote(blas_threads)) == [1]
    finally:
        ray.kill(plain)
        ray.kill(worker)


def test_sigint_stops_cleanly_and_the_run_resumes_without_repeats(tmp_path):
    folder = tmp_path / "interrupted"
    # 256 classes: enough reachable trees for a budget far beyond the 3 seen before SIGINT, which must land mid-search
    args = [*CLI, *SEARCH, "--agent", "tpe", "--budget", "16", "--planted-classes", "256", "--out", str(folder)]

    def default_sigint() -> None:  # a parent that ignores SIGINT (some runners do) would pass that on
        signal.signal(signal.SIGINT, signal.SIG_DFL)

    process = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=environment(),
                               preexec_fn=default_sigint)  # fmt: skip
    reported = 0
    for line in process.stdout:
        reported += line.lstrip().startswith("[")
        if reported == 3:
            break
    process.send_signal(signal.SIGINT)
    rest, stderr = process.communicate(timeout=120)
    later = sum(line.lstrip().startswith("[") for line in rest.splitlines())
    assert process.returncode == 130, (
        f"exit {process.returncode}, {later} more evaluations after SIGINT: {stderr[-1500:]}"
    )
    before = len(Run(folder).evaluations())
    assert before >= 3
    resumed = subprocess.run([*CLI, "search", "--resume", str(folder), "--no-compare"], capture_output=True, text=True,
                             env=environment())  # fmt: skip
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert f"{before} evaluations on disk" in resumed.stdout
    keys = counted(folder)
    assert len(keys) == len(set(keys)) == 16


def run_two_workers(tmp_path: Path, storage: str) -> optuna.Study:
    processes = [
        subprocess.Popen(
            [
                *CLI,
                *SEARCH,
                "--agent",
                "tpe",
                "--budget",
                "4",
                "--storage",
                storage,
                "--study",
                "shared",
                "--seed",
                str(k),
                "--out",
                str(tmp_path / f"worker{k}"),
            ],  # fmt: skip
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=environment(),
        )  # fmt: skip
        for k in range(2)
    ]
    for process in processes:
        _, stderr = process.communicate(timeout=300)
        assert process.returncode == 0, stderr[-3000:]
    for k in range(2):
        assert len(set(counted(tmp_path / f"worker{k}"))) == 4
    return optuna.load_study(study_name="shared", storage=storage)


def test_two_optuna_workers_share_one_sqlite_study(tmp_path):
    study = run_two_workers(tmp_path, f"sqlite:///{tmp_path / 'shared.db'}")
    finished = [
        t for t in study.trials if t.state in (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)
    ]
    assert len(finished) >= 8


@pytest.mark.slow
@pytest.mark.skipif(not (PG_BIN / "initdb").exists(), reason="PostgreSQL server binaries are not installed")
def test_two_optuna_workers_share_one_postgresql_study(tmp_path):
    base, port = Path(tempfile.mkdtemp(prefix="tree-search-pg-")), free_port()  # pytest's tmp folders are private
    data = base / "data"
    user = {} if os.geteuid() else {"user": "postgres"}
    if user:  # PostgreSQL refuses to run as root
        shutil.chown(base, "postgres")
    run = lambda *args: subprocess.run([str(PG_BIN / args[0]), *args[1:]], check=True, capture_output=True, **user)  # noqa: E731
    run("initdb", "-D", str(data), "-A", "trust", "-U", "postgres")
    run("pg_ctl", "-D", str(data), "-l", str(base / "log"), "-o", f"-p {port} -k {data} -h 127.0.0.1", "-w", "start")
    try:
        url = f"postgresql+psycopg2://postgres@127.0.0.1:{port}/postgres"
        study = run_two_workers(tmp_path / "runs", url)
        finished = [
            t for t in study.trials if t.state in (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)
        ]
        assert len(finished) >= 8
    finally:
        run("pg_ctl", "-D", str(data), "-m", "fast", "-w", "stop")
        shutil.rmtree(base, ignore_errors=True)


def test_ray_pool_trains_a_tree_proposed_twice_at_once_only_once(ray_session):
    from tree_search.builders import huffman
    from tree_search.distributed.ray_evaluator import RayEvaluator

    dataset = load_env_dataset(CONFIG)
    evaluator = RayEvaluator(dataset, QUICK, budget=1, workers=2)
    try:
        tree = huffman(dataset.counts, 4)
        tickets = [evaluator.submit(tree), evaluator.submit(tree.canonical())]  # both in flight together
        done = {}
        while len(done) < 2:
            done.update(evaluator.collect())
        assert sorted(e.counted for e in done.values()) == [False, True]
        assert evaluator.stats()["done"] == 1 and evaluator.stats()["cached"] == 1 and evaluator.exhausted
        assert done[tickets[0]].valid_nll == done[tickets[1]].valid_nll
    finally:
        evaluator.close()


def test_optuna_storage_urls(tmp_path):
    from tree_search.agents.optuna_search import open_storage

    journal = open_storage(f"journal:{tmp_path / 'study.log'}")
    assert isinstance(journal, optuna.storages.JournalStorage)
    study = optuna.create_study(storage=journal, study_name="s")
    study.optimize(lambda trial: trial.suggest_float("x", 0, 1), n_trials=2)
    assert len(optuna.load_study(study_name="s", storage=open_storage(f"journal:{tmp_path / 'study.log'}")).trials) == 2
    assert isinstance(open_storage(f"sqlite:///{tmp_path / 'a.db'}"), optuna.storages.RDBStorage)
    assert open_storage(None) is None


def test_ppo_samples_in_remote_env_runners_that_score_through_the_driver(ray_session, tmp_path):
    from tree_search.agents.policy import PolicyConfig
    from tree_search.agents.rllib_search import RLlibSearcher
    from tree_search.distributed.ray_evaluator import RayEvaluator

    dataset = load_env_dataset(CONFIG)
    run = Run.create(tmp_path / "run", {})
    evaluator = RayEvaluator(dataset, QUICK, budget=6, listeners=[run.record], workers=2)

    def driver_env_factory(reward_fn):
        raise AssertionError("with remote env runners no environment may be built in the driver")

    searcher = RLlibSearcher(
        "ppo",
        driver_env_factory,
        evaluator,
        run=run,
        policy=PolicyConfig(batch_steps=16, minibatch_size=8, num_epochs=2),
        env_runners=2,
        env_config={"env": "split", **CONFIG.to_env_config()},
        dataset=dataset,
    )
    try:
        rows = list(searcher.search())
    finally:
        evaluator.close()
    on_disk = [e for e in run.evaluations() if e.counted]
    print(f"relay served {searcher.relay.served} requests from {sorted(searcher.relay.clients)}")
    assert len(rows) == len(on_disk) == 6 == len({e.key for e in on_disk})
    assert {e.searcher for e in on_disk} == {"ppo"} and all(e.ok for e in on_disk)
    clients = searcher.relay.clients
    assert len(clients) == 2 and not any(c.endswith(f":{os.getpid()}") for c in clients)  # two runner processes
    assert searcher.relay.served >= 6


def test_a_remote_environment_s_dense_node_trainings_reach_the_driver_s_budget(ray_session):
    """`RelayReward.charge_nodes` in another process: the driver's evaluator is charged, under the searcher's label."""
    import ray

    from tree_search.agents.base import SearcherReward
    from tree_search.agents.relay import RelayReward, RelayServer
    from tree_search.builders import huffman
    from tree_search.reward.evaluator import LocalEvaluator

    dataset = load_env_dataset(CONFIG)
    evaluator = LocalEvaluator(dataset, QUICK, budget=5)
    relay = RelayServer(lambda tree, projections=None: evaluator.reward(tree, projections)[0], dataset,
                        charge_fn=SearcherReward(None, evaluator, "ppo@2x").charge_nodes)  # fmt: skip
    tree = huffman(dataset.counts, 4)

    @ray.remote
    def remote_episode(name):
        RelayReward(name).charge_nodes(tree, None, 7)
        return os.getpid()

    try:
        assert ray.get(remote_episode.remote(relay.name)) != os.getpid()
    finally:
        relay.close()
    assert evaluator.charged == {"ppo@2x": pytest.approx(7 / tree.num_internal)}
    assert relay.served == 0  # a charge is not a reward served
    assert evaluator.remaining == 4


def test_training_callbacks_run_in_the_driver_for_ray_actors(ray_session):
    from tree_search.builders import huffman
    from tree_search.distributed.ray_evaluator import RayEvaluator

    dataset = load_env_dataset(CONFIG)
    evaluator = RayEvaluator(dataset, QUICK, workers=1)
    seen = []

    def stop_at_the_second_measurement(point):
        seen.append((threading.get_ident(), point.step, point.valid_nll))
        return len(seen) >= 2

    def broken(point):
        raise KeyError("pruner storage gone")

    try:
        pruned = evaluator.evaluate(huffman(dataset.counts, 2), callbacks=[stop_at_the_second_measurement])
        assert pruned.pruned and len(seen) == 2  # the driver's answer stopped the actor's training
        history = pruned.result["extra"]["history"]
        assert [(p[0], p[2]) for p in history[:2]] == [(s, v) for _, s, v in seen]  # (step, epoch, nll, ...)
        with pytest.raises(KeyError, match="pruner storage gone"):  # as in process: the callback's error
            evaluator.evaluate(huffman(dataset.counts, 3), callbacks=[broken])
        assert evaluator.evaluate(huffman(dataset.counts, 3)).ok  # the actor was told to stop, not left waiting
    finally:
        evaluator.close()


def test_optuna_prunes_trials_evaluated_on_ray_actors(ray_session):
    from tree_search.distributed.ray_evaluator import RayEvaluator

    dataset = load_env_dataset(CONFIG)
    # 16 trials: the pruner waits for 4 complete ones, and which trials are complete when another reports depends
    # on the two actors' timing; with 10 a run without any pruned trial happened now and then
    evaluator = RayEvaluator(dataset, QUICK, budget=16, workers=2)
    try:
        rows = list(OptunaSearcher("random", env_factory(dataset), evaluator, seed=3, prune=True, parallel=2).search())
    finally:
        evaluator.close()
    assert len(rows) == 16 == len({r.key for r in rows})
    assert any(r.pruned for r in rows), [r.pruned for r in rows]


def test_batched_evaluations_share_actor_calls_and_fail_alone(ray_session):
    from tree_search.agents.baselines import dataset_classics
    from tree_search.distributed.ray_evaluator import RayEvaluator

    dataset = load_env_dataset(CONFIG)
    names = ("huffman-2", "huffman-3", "huffman-4", "balanced-2", "balanced-4")
    trees = [(c.tree, c.projections) for c in dataset_classics(dataset, names).values()]
    evaluator = RayEvaluator(dataset, QUICK, workers=1, batch=4)
    try:
        tickets = [evaluator.submit(tree, projections, counted=False) for tree, projections in trees]
        tickets.append(evaluator.submit(trees[0][0], {10_000: 4}, counted=False))  # no such node: a bug, raised alone
        done, raised = {}, []
        while len(done) + len(raised) < len(tickets):
            try:
                done.update(evaluator.collect())
            except ValueError as error:
                raised.append(str(error))
    finally:
        evaluator.close()
    assert sorted(done) == tickets[:-1] and all(e.ok for e in done.values())
    assert len(raised) == 1 and "projection 10000" in raised[0]
    assert 2 <= evaluator.stats()["batched_calls"] < len(tickets)  # some calls carried several evaluations


@pytest.mark.parametrize("batch", [1, 2])
def test_closing_the_pool_releases_every_thread_waiting_for_an_actor(ray_session, batch):
    from tree_search.builders import huffman
    from tree_search.distributed.ray_evaluator import EvaluatorClosed, RayEvaluator

    dataset = load_env_dataset(CONFIG)
    evaluator = RayEvaluator(dataset, QUICK, workers=1, batch=batch)
    outcomes = []

    def evaluate(arity):
        try:
            outcomes.append(evaluator.evaluate(huffman(dataset.counts, arity)))
        except EvaluatorClosed as closed:
            outcomes.append(closed)

    threads = [threading.Thread(target=evaluate, args=(arity,)) for arity in (2, 3, 4, 5, 6)]
    for thread in threads:
        thread.start()
    time.sleep(1.0)
    evaluator.close()
    for thread in threads:
        thread.join(timeout=15)
    assert not any(thread.is_alive() for thread in threads)  # none left waiting for an actor that never comes
    assert len(outcomes) == 5 and any(isinstance(o, EvaluatorClosed) for o in outcomes)


def test_dp_plans_with_node_shares_from_ray_actors_as_from_a_local_evaluator(ray_session):
    """dp on Ray actors (which compute the node shares it plans with) asks for the same trees and gets the same NLLs."""
    from tree_search.agents.baselines import BaselineSearcher
    from tree_search.agents.dp_search import DPSearcher
    from tree_search.builders import huffman
    from tree_search.distributed.ray_evaluator import RayEvaluator
    from tree_search.reward.evaluator import LocalEvaluator

    config = dataclasses.replace(CONFIG, cost_cap=1.5)
    dataset = load_env_dataset(config)
    local = [(e.key, e.valid_nll) for e in DPSearcher(LocalEvaluator(dataset, QUICK, budget=16), dataset,
                                                      config).search()]  # fmt: skip
    evaluator = RayEvaluator(dataset, QUICK, budget=16, workers=2)
    try:
        baselines = BaselineSearcher(evaluator, dataset, "huffman-2,huffman-3,kmeans-2")
        classics = {e.searcher: e for e in baselines.search()}
        searcher = DPSearcher(evaluator, dataset, config)
        remote = [(e.key, e.valid_nll) for e in searcher.search()]
    finally:
        evaluator.close()
    # the classic trees, submitted together to the actors: each once, each as a local evaluation scores it
    assert sorted(classics) == ["baseline:huffman-2", "baseline:huffman-3", "baseline:kmeans-2"]
    assert not any(e.counted for e in classics.values())
    two = LocalEvaluator(dataset, QUICK).evaluate(huffman(dataset.counts, 2))
    assert classics["baseline:huffman-2"].valid_nll == pytest.approx(two.valid_nll, rel=1e-9)
    # knapsack trees, predicted from the node shares the actors computed for other trees, then evaluated
    assert searcher.predictions
    for predicted, evaluated, _ in searcher.predictions:
        assert predicted == pytest.approx(evaluated, rel=1e-9, abs=1e-9)
    assert len(local) == 16 and [key for key, _ in remote] == [key for key, _ in local]
    # the actors train with one thread, this process with two: float32 sums may round apart (1e-9 seen)
    assert [nll for _, nll in remote] == pytest.approx([nll for _, nll in local], rel=1e-7)
