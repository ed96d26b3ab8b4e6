"""Runtime drivers, one package per runtime; base.py is the contract, registry.py the list of
runtimes (name, Options, driver) that everything else reads."""
