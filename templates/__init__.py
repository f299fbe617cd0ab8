# Makes templates/ importable as gemmachat.builtin_templates (see pyproject.toml), so the
# installed program finds these files; the templates themselves are the .toml files here.
