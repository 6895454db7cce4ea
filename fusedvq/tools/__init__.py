"""The tools around the loss, none of them imported by it: the `fusedvq` command (cli.py), the demo
(demo.py, with its built-in world in world.py, its side checks in demo_checks.py and a hybrid checkpoint's
step in hybrid_step.py) and the benchmark (benchmark/, `fusedvq bench`)."""
