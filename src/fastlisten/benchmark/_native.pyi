from typing import Any, Dict, Tuple

MAX_SECONDS: float
LOADGEN_SCENARIOS: Dict[str, int]

def loadgen_run(address: Tuple[str, int], scenario: str, concurrency: int, total: int,
                duration: float, timeout: float, src_spread: int = ...,
                request: bytes = ..., expect_min: int = ...) -> Dict[str, Any]: ...
def refserver_serve(lfd: int, stop_fd: int, scenario: str, reply: bytes) -> Dict[str, int]: ...
