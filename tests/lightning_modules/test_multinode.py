"""Multi-node DDP on one machine: 2 nodes × 1 process (torchrun --nnodes 2, gloo) against 1 node × 2 processes."""

from __future__ import annotations

import socket
import subprocess
import sys
from pathlib import Path

import torch

from tests.conftest import REPO, subprocess_env

SCRIPT = REPO / "tests/scripts/multinode_run.py"
TORCHRUN = str(Path(sys.executable).with_name("torchrun"))


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _torchrun(nnodes: int, nproc: int, node_rank: int, port: int, cache: Path, out: Path) -> subprocess.Popen:
    command = [TORCHRUN, "--nnodes", str(nnodes), "--nproc_per_node", str(nproc), "--node_rank", str(node_rank),
               "--master_addr", "127.0.0.1", "--master_port", str(port), str(SCRIPT), str(cache), str(out),
               str(nnodes), str(nproc)]
    return subprocess.Popen(command, cwd=out, env=subprocess_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)


def _run(nnodes: int, nproc: int, cache: Path, out: Path) -> list[dict]:
    """Start one torchrun per node (all on localhost), wait for all, load every rank's weights."""
    out.mkdir()
    port = _free_port()
    nodes = [_torchrun(nnodes, nproc, rank, port, cache, out) for rank in range(nnodes)]
    for node in nodes:
        output, _ = node.communicate(timeout=600)
        assert node.returncode == 0, output[-3000:]
    return [torch.load(out / f"rank{rank}.pt", weights_only=True) for rank in range(nnodes * nproc)]


def _assert_equal(first: dict, second: dict, what: str) -> None:
    assert first.keys() == second.keys()
    for key, value in first.items():
        assert torch.equal(value, second[key]), f"{what}: {key}"


def test_two_nodes_match_one_node_with_two_processes(cohort_cache: Path, tmp_path: Path) -> None:
    two_nodes = _run(2, 1, cohort_cache, tmp_path / "two_nodes")
    one_node = _run(1, 2, cohort_cache, tmp_path / "one_node")
    assert [r["node_rank"] for r in two_nodes] == [0, 1] and [r["node_rank"] for r in one_node] == [0, 0]
    assert all(r["world_size"] == 2 and r["iteration"] == 2 for r in two_nodes + one_node)
    for stage in ("pretrained", "policy"):
        _assert_equal(two_nodes[0][stage], two_nodes[1][stage], f"2 nodes, rank 0 vs 1, {stage}")
        _assert_equal(two_nodes[0][stage], one_node[0][stage], f"2 nodes vs 1 node, {stage}")
        _assert_equal(one_node[0][stage], one_node[1][stage], f"1 node, rank 0 vs 1, {stage}")
    before, after = two_nodes[0]["pretrained"], two_nodes[0]["policy"]
    # PPO changed the weights: the comparison is not between untouched copies
    assert any(not torch.equal(value, before[key]) for key, value in after.items())
