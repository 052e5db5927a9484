"""Calls the cluster's api through the agent's outbound proxy (HTTP_PROXY)."""
import urllib.request

opener = urllib.request.build_opener(
    urllib.request.ProxyHandler({"http": "http://127.0.0.1:4140"})
)
for _ in range(30):
    try:
        with opener.open("http://api.shop.svc.cluster.local:8080/", timeout=10) as r:
            print(r.read().decode().replace("\n", " "))
            break
    except Exception as e:  # retried: discovery may still be arriving
        last = e
        import time

        time.sleep(1)
else:
    print("error", last)
