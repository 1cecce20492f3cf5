from cellseg.cli import main

main()
