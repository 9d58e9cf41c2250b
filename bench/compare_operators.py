"""Deploy overhead of two operator scripts side by side, against one floor.

Usage (root): python3 bench/compare_operators.py OTHER_SCRIPT [ROUNDS]

OTHER_SCRIPT is crate_operator.py of another revision, for example from
`git archive <commit> | tar -x -C /tmp/base`. Both operators run in one
sandbox with one Caddy. Each round makes one floor deploy in place and
one switch, then one update per strategy and operator, with the order of
the two operators alternating per round, so load from other processes
falls on all of them. Prints per strategy the floor, both medians and the
median of the paired differences (this checkout minus OTHER_SCRIPT).
"""

from __future__ import annotations

import statistics
import sys

import run_bench as rb
from run_bench import harness
from floor import FloorDeployer

STRATEGIES = (
    ("immediate", {}),
    ("bluegreen", {"deployment_strategy": "bluegreen"}),
    ("canary", {"deployment_strategy": "canary",
                "canary": {"steps": [100], "pause_s": 0}}),
)


def compare(env: rb.Environment, other_script: str, rounds: int) -> list:
    """Run the rounds and return one printable line per strategy."""
    other = harness.OperatorProcess(env.shared, env.sandbox, env.caddy,
                                    rb.OPERATOR_OVERRIDES, script=other_script)
    env.extra.append(other)
    other.start()
    operators = {"other": other, "this": env.operator}

    floor = FloorDeployer(env.shared, env.sandbox, env.caddy,
                          "floor.example.test")
    ports = {"blue": harness.free_port(), "green": harness.free_port()}
    floor.deploy(env.new_asset("f"), "blue", ports["blue"])
    floor_slot = "blue"

    bodies = {}
    for label, operator in operators.items():
        for name, _changes in STRATEGIES:
            bodies[label, name] = env.slots_body(env.next_id(), env.new_asset())
            rb.deploy(operator, rb.SLOTS, bodies[label, name])

    times: dict = {key: [] for key in bodies}
    floor_times: dict = {"in place": [], "switch": []}
    for index in range(rounds):
        floor_times["in place"].append(floor.deploy(
            env.new_asset("f"), floor_slot, ports[floor_slot]))
        next_slot = "green" if floor_slot == "blue" else "blue"
        floor_times["switch"].append(floor.deploy(
            env.new_asset("f"), next_slot, ports[next_slot], floor_slot))
        floor_slot = next_slot
        order = ("other", "this") if index % 2 == 0 else ("this", "other")
        for name, changes in STRATEGIES:
            for label in order:
                body = env.update(bodies[label, name], env.new_asset(),
                                  **changes)
                bodies[label, name] = body
                times[label, name].append(
                    rb.deploy(operators[label], rb.SLOTS, body)[0])

    floor.cleanup()
    lines = []
    for name, _changes in STRATEGIES:
        floor_ms = statistics.median(
            floor_times["in place" if name == "immediate" else "switch"]) * 1000
        other_ms = statistics.median(times["other", name]) * 1000
        this_ms = statistics.median(times["this", name]) * 1000
        differences = [(a - b) * 1000 for a, b in
                       zip(times["this", name], times["other", name])]
        faster = sum(difference < 0 for difference in differences)
        lines.append(
            "%-9s floor %4.0f ms | other %4.0f ms (%.2f) | this %4.0f ms "
            "(%.2f) | paired median %+.0f ms, this faster in %d of %d"
            % (name, floor_ms, other_ms, other_ms / floor_ms, this_ms,
               this_ms / floor_ms, statistics.median(differences), faster,
               len(differences)))
    return lines


def main() -> int:
    """Start the environment, compare, print and clean up."""
    if len(sys.argv) not in (2, 3):
        sys.stderr.write(__doc__)
        return 2
    rounds = int(sys.argv[2]) if len(sys.argv) == 3 else 20
    env = rb.Environment()
    try:
        env.start()
        lines = compare(env, sys.argv[1], rounds)
    finally:
        env.stop()
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
