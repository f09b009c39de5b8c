"""`python benchmarks/precompute_speedup.py`: the 'shards' part of benchmarks/speed.py (see its docstring)."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from speed import main  # noqa: E402

if __name__ == "__main__":
    sys.argv[1:1] = ["--only", "shards"]
    sys.exit(main())
