"""`megalite bench moe` runs at tiny sizes and prints both tables: every variant of the layer, the ratio, and the
training step of a baseline tree against this one (by default the revision before issue 17, exported with git), each
in a process of its own, with equal first-step losses; a baseline that is neither a revision nor a tree is refused."""
from megalite.bench import moe

TINY = ["--experts", "4,8", "--topk", "1,2", "--hidden-size", "32", "--moe-ffn-hidden-size", "16", "--seq-length", "16",
        "--num-layers", "1", "--vocab-size", "64", "--iters", "2", "--warmup", "1", "--threads", "1"]


def test_bench_moe_prints_both_tables(world_of_one, capsys):
    """The baseline here is this tree itself, given as a directory (a shallow clone may lack the default revision):
    two worker processes, one table."""
    tree = moe.this_tree()
    assert moe.main(TINY + ["--baseline", str(tree)]) == 0
    out = capsys.readouterr().out
    assert "Table 1" in out and "Table 2" in out and "blocked/loop" in out
    assert out.count("|       8 |     2 |") == 1
    assert f"before: megalite at --baseline {tree} ({tree}); now: {tree}" in out and "(equal to 1e-5)" in out
    assert "| before   |" in out and "| now      |" in out and "now / before = " in out


def test_bench_moe_refuses_an_unknown_baseline(world_of_one, capsys, tmp_path):
    assert moe.main(TINY + ["--baseline", str(tmp_path / "nowhere")]) == 2
    out, err = capsys.readouterr()
    assert f"--baseline {tmp_path / 'nowhere'}: neither a directory holding megalite/ nor a revision" in err
    assert "Table 1" not in out  # refused before any work


def test_bench_moe_without_a_baseline_prints_table_1_only(world_of_one, capsys):
    assert moe.main(TINY + ["--baseline", "none"]) == 0
    out = capsys.readouterr().out
    assert "Table 1" in out and "Table 2" not in out
