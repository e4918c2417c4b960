from onnxopt.cli import main

raise SystemExit(main())
