"""The local Slack world, not the product: the Slack Web API emulator (emulator.py),
the sandbox that runs the real bot against it over loopback HTTP (sandbox.py), and
`breakglass demo` (demo.py). Used by the demo, the tests and the benches; production
modules never import it (tests/test_layering.py), only cli.py's `demo` command does."""
