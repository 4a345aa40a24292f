"""A VTEX simulator on loopback, written from the project's VTEX reference
(../shared/vtex/README.md; "doc §N" in these modules points into it): the test oracle
for omsd. It imports nothing from omsd.state or omsd.daemon (tests/test_sim_isolation.py).
"""
