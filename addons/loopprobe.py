"""The event-loop lag probe alone, for a bare mitmdump beside douane in a benchmark:
`mitmdump -s addons/loopprobe.py --set douane_loop_stats=FILE` (douane.health.LoopProbe; no
gc.freeze, nothing else of douane)."""

from douane.health import LoopProbe

addons = [LoopProbe()]
