"""The application layer: typed configuration, building a model/guide pair by name, the main job
(train, evaluate, write results), figures and the command line."""
