"""The application layer: typed configuration (:mod:`~pyrovae.app.config`), the model/guide family
specs it reads (:mod:`~pyrovae.app.registry`, :mod:`~pyrovae.app.families`), building a pair by name
(:mod:`~pyrovae.app.build`), the main job (:mod:`~pyrovae.app.run`), figures and the command line
(:mod:`~pyrovae.app.cli`, whose flags are generated from the config)."""
