"""Exit 0 when the agent's admin endpoint says ready."""
import sys
import urllib.request

try:
    with urllib.request.urlopen("http://127.0.0.1:4191/ready", timeout=2) as r:
        sys.exit(0 if r.status == 200 else 1)
except Exception:
    sys.exit(1)
