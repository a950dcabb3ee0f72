"""What a run's artifacts record of what made them (every JSON field whose name holds 'hash' or 'fingerprint') and
the sha256 of every weights file (*.safetensors) and data shard (*.parquet). Usage: run_hashes.py RUN_DIR"""
import hashlib, json, sys
from pathlib import Path

run = Path(sys.argv[1])
out = {}
def walk(value, where):
    if isinstance(value, dict):
        for k, v in value.items():
            if isinstance(v, (str, int)) and ("hash" in k or "fingerprint" in k):
                out[f"{where}:{k}"] = v
            else:
                walk(v, f"{where}.{k}")
    elif isinstance(value, list):
        for i, v in enumerate(value):
            walk(v, f"{where}[{i}]")
for f in sorted(run.rglob("*")):
    rel = str(f.relative_to(run))
    if "logs" in f.parts or "_train" in rel or "encoder_train" in rel or not f.is_file():
        continue
    if f.suffix == ".json":
        try:
            walk(json.loads(f.read_text()), rel)
        except Exception:
            pass
    elif f.suffix in (".safetensors", ".parquet"):
        out[rel] = hashlib.sha256(f.read_bytes()).hexdigest()[:16]
for k, v in out.items():
    print(k, v)
