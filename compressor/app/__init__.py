"""The application layer: the recipe (schema, YAML loading, overrides), the `compress` pipeline as stage functions
over one run state, the report (report.json / report.md / plots), `inspect`, accuracy of any artifact (`eval`), and
the Typer CLI. It composes the stages below and owns no pruning, training or deployment logic itself."""
