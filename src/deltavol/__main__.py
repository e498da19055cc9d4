from deltavol.cli import main

main()
