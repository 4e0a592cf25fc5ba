from memzoo.bench.cli import main

raise SystemExit(main())
