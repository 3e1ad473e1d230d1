"""`mind`, the command line: one typer app on top of every other package; nothing imports it."""
