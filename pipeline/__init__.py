"""Framework-free core of rws: layers, the Helmholtz machine, RWS estimators, data and communication.

Imports torch and numpy only (never Lightning or Ray), so it can be used from any training loop.
"""
