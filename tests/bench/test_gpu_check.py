"""launch/gpu_check.sh runs end to end (on CPU with --smoke: tiny shapes; the CUDA tests skip) and prints its one
table: the CUDA test summary, training TFLOP/s of both shapes, generation tokens/s."""
import re
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_gpu_check_script_runs_and_prints_one_table():
    done = subprocess.run(["bash", str(ROOT / "launch" / "gpu_check.sh"), "--smoke"], capture_output=True, text=True,
                          timeout=300, cwd="/")
    assert done.returncode == 0, done.stderr[-2000:]
    rows = [line for line in done.stdout.splitlines() if line.startswith("| ") and "---" not in line]
    assert rows[0] == "| check | result | detail |" and len(rows) == 6
    assert re.search(r"\| CUDA tests \| (\d+ skipped|\d+ passed)", rows[1])
    assert all(re.search(r"\| [\d.e+-]+ TFLOP/s per device \|", r) for r in rows[2:4])
    assert all(re.search(r"\| \d+ new tokens/s \|", r) for r in rows[4:6])
