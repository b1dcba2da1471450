"""Scenario files shipped with CMAI (installed as the package ``cmai_env.scenarios``).

Each ``*.yaml`` here is one scenario, validated by :mod:`cmai_env.scenario`; list them with
``cmai scenarios list`` or :func:`cmai_env.scenarios_available`, and load one by name with
:func:`cmai_env.scenario.load_scenario`. The comment header of each file says what it tests.
"""
