"""`megalite bench moe` runs at tiny sizes and prints both tables: every variant of the layer, the ratio, and the
training step's equal first-step losses."""
from megalite.bench import moe


def test_bench_moe_prints_both_tables(world_of_one, capsys):
    argv = ["--experts", "4,8", "--topk", "1,2", "--hidden-size", "32", "--moe-ffn-hidden-size", "16",
            "--seq-length", "16", "--num-layers", "1", "--vocab-size", "64", "--iters", "2", "--warmup", "1",
            "--threads", "0"]
    assert moe.main(argv) == 0
    out = capsys.readouterr().out
    assert "Table 1" in out and "Table 2" in out and "blocked/loop" in out
    assert out.count("|       8 |     2 |") == 1
    assert "now / before = " in out and "(equal to 1e-5)" in out and "before: loop experts etc." in out
