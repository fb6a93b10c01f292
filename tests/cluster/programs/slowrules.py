# A server slower than its workers, loaded with --plugin: "slow_sum" sums, 30 ms per push.
import time

import pserver


class SlowSum(pserver.Updater):
    def apply(self, w, state, pushed):
        time.sleep(0.03)
        w += pushed


pserver.register_updater("slow_sum", lambda **args: SlowSum())
