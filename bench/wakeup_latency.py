"""Latency from ``wakeup()`` in one thread to ``accept_many`` returning in
another (the mechanism behind an immediate ``shutdown()``).

Run: ``python bench/wakeup_latency.py [rounds]``; prints p50/p99/max in µs.
"""

import sys
import threading
import time

import fastlisten


def measure(rounds: int = 300) -> list:
    out = []
    with fastlisten.listen(("127.0.0.1", 0)) as lst:
        for _ in range(rounds):
            entered, returned = threading.Event(), []

            def waiter():
                entered.set()
                lst.accept_many(8, timeout=10)
                returned.append(time.perf_counter())

            t = threading.Thread(target=waiter)
            t.start()
            entered.wait()
            time.sleep(0.002)      # let it reach poll(); only affects what is measured
            t0 = time.perf_counter()
            lst.wakeup()
            t.join()
            out.append(returned[0] - t0)
    return sorted(out)


if __name__ == "__main__":
    lat = measure(int(sys.argv[1]) if len(sys.argv) > 1 else 300)

    def pick(q: float) -> float:
        return lat[min(len(lat) - 1, int(q * len(lat)))] * 1e6

    print(f"core={'compiled' if fastlisten.compiled else 'python'} rounds={len(lat)} "
          f"wakeup->return p50={pick(0.5):.0f}us p99={pick(0.99):.0f}us max={lat[-1] * 1e6:.0f}us")
