"""Calls the cluster's api: through the agent's outbound proxy
(HTTP_PROXY), or with `direct` as an app that knows nothing of the mesh
(the agent's DNS and transparent capture take it there)."""
import sys
import time
import urllib.request

direct = sys.argv[1:] == ["direct"]
proxies = {} if direct else {"http": "http://127.0.0.1:4140"}
opener = urllib.request.build_opener(urllib.request.ProxyHandler(proxies))
for _ in range(30):
    try:
        with opener.open("http://api.shop.svc.cluster.local:8080/", timeout=10) as r:
            print(r.read().decode().replace("\n", " "))
            break
    except Exception as e:  # retried: discovery may still be arriving
        last = e
        time.sleep(1)
else:
    print("error", last)
