"""``python -m harmonizer_fast.zoo OUT [--quick]``: the README demo sweep (see :func:`harmonizer_fast.zoo.demo_sweep`)."""
from harmonizer_fast.zoo.demo import main

raise SystemExit(main())
