"""The trainer on one machine: `dhad run -f` (run), the demo, and the tiny-model bootstrap every test
and the demo start from. May import anything in the trainer; nothing in the trainer imports local/
except tests and the CLI.
"""
