"""pyrovae's own model and guide families, one module each with its builder and its spec
(``SPECS``), registered by name in :data:`pyrovae.app.registry.FAMILY_MODULES`.

Each module imports its model's code inside the builder, so reading the registry (the config's
choices, ``pyrovae train --help``) loads no network code."""
