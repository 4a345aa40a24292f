"""A VTEX simulator on loopback, written from VTEX's documentation: the test oracle
for omsd. It imports nothing from omsd.state or omsd.daemon (tests/test_sim_isolation.py)."""
