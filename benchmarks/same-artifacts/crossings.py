"""Files of envenc_ray (config.py left out) that read the settings stage2.method (`.stage2.method` or
`.stage2.joint`) and vlm.pooling (`<config>.vlm.pooling`, an attribute chain through `.vlm`: a VLM object's own
`.pooling` is not the setting), counted by an AST walk. Usage: crossings.py ROOT"""
import ast, sys
from pathlib import Path

root = Path(sys.argv[1]) / "envenc_ray"
hits = {"stage2.method": set(), "vlm.pooling": set()}
for f in sorted(root.rglob("*.py")):
    if f.name == "config.py" and f.parent == root:
        continue
    for node in ast.walk(ast.parse(f.read_text())):
        if not isinstance(node, ast.Attribute) or not isinstance(node.value, ast.Attribute):
            continue
        owner = node.value.attr
        if node.attr in ("method", "joint") and owner == "stage2":
            hits["stage2.method"].add(str(f.relative_to(root)))
        if node.attr == "pooling" and owner == "vlm":
            hits["vlm.pooling"].add(str(f.relative_to(root)))
for k, v in hits.items():
    print(k, len(v), sorted(v))
